"""Evaluation stage wall time and questions/s: SmolLM2-135M-Instruct on the CMMLU medical subjects and PubMedQA.

    python bench/bench_eval.py                                   # 0-shot, every question (~20+ min on 2 busy cores)
    python bench/bench_eval.py --runs cmmlu:5:40,pubmedqa:5:20   # 5-shot, first 40 / 20 questions per subject
    nice -n 10 python bench/bench_eval.py --runs cmmlu:0:,pubmedqa:0: --batch_size 8

A run is ``benchmark:num_fewshot:limit`` (empty limit = all questions). ``cmmlu`` is
../shared/data/eval/cmmlu_medical (5 subjects, 1,219 test questions, 5 dev questions each); ``pubmedqa`` is the
published PQA-L test split: a folder of symlinks to ../shared's pubmedqa_pqal_1k.json and
pubmedqa_test_ground_truth.json (500 test PMIDs; the other 500 are the k-shot pool). Each run is one
``eval_benchmarks.py`` process (its own timing: lm-eval's scoring loop, model load excluded) plus the whole process's
wall time. The CPU model, its flags and the load average before and after each run are recorded next to the
figures. Results: bench/results/eval-<time>.{json,md} and bench/results/eval-latest.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
ENV = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def benchmark_dir(name: str, workdir: str) -> str:
    if name == "cmmlu":
        return str(SHARED / "eval" / "cmmlu_medical")
    if name == "pubmedqa":
        folder = os.path.join(workdir, "pubmedqa")
        os.makedirs(folder, exist_ok=True)
        for file in ("pubmedqa_pqal_1k.json", "pubmedqa_test_ground_truth.json"):
            link = os.path.join(folder, file)
            if not os.path.exists(link):
                os.symlink(SHARED / "medical-en" / file, link)  # a link, never a copy of ../shared
        return folder
    raise SystemExit(f"unknown benchmark {name!r}: cmmlu or pubmedqa")


def run_one(spec: str, model: str, batch_size: int, workdir: str, extra: list[str]) -> dict:
    name, shots, limit = (spec.split(":") + ["", ""])[:3]
    out = os.path.join(workdir, f"out-{name}-{shots}shot-{limit or 'all'}")
    cmd = [sys.executable, str(ROOT / "eval_benchmarks.py"), "--model_name_or_path", model,
           "--benchmark_dir", benchmark_dir(name, workdir), "--output_dir", out, "--num_fewshot", shots or "0",
           "--batch_size", str(batch_size), "--overwrite_output_dir"] + (["--limit", limit] if limit else []) + extra
    before = load()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **ENV), cwd=ROOT)
    process_s = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{spec}: eval_benchmarks.py failed ({proc.returncode})")
    with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
        results = json.load(fh)
    row = {"run": spec, "benchmark": name, "num_fewshot": int(shots or 0), "limit": int(limit) if limit else None,
           "questions": results["timing"]["questions"], "scoring_s": results["timing"]["wall_s"],
           "questions_per_s": results["timing"]["questions_per_s"], "process_s": round(process_s, 1),
           "load_before": before, "load_after": load(), "subjects": results["subjects"],
           "micro_average": results["micro_average"], "macro_average": results["macro_average"]}
    print(f"{spec}: {row['questions']} questions, scoring {row['scoring_s']} s ({row['questions_per_s']} q/s), "
          f"process {row['process_s']} s, micro acc {row['micro_average']['acc']:.4f}; load {before} -> "
          f"{row['load_after']}", flush=True)
    return row


def markdown(report: dict) -> str:
    lines = [f"# eval bench {report['time']}", "",
             f"model {report['model']}, batch {report['batch_size']}, CPU {report['environment']['cpu_model']} "
             f"({report['environment']['cpu_count']} cores; {' '.join(report['environment']['precision_flags'])}); "
             "shared machine, load averages "
             "(1/5/15 min) before -> after each run.", "",
             "| run | subject | n | acc | ± | acc_norm | ± |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in report["runs"]:
        for subject, r in list(row["subjects"].items()) + [("micro average", row["micro_average"]),
                                                            ("macro average", row["macro_average"])]:
            se, se_norm = (f"{v:.4f}" if v is not None else "-" for v in (r["acc_stderr"], r["acc_norm_stderr"]))
            lines.append(f"| {row['run']} | {subject} | {r['n']} | {r['acc']:.4f} | {se} | {r['acc_norm']:.4f} | "
                         f"{se_norm} |")
    lines += ["", "| run | questions | scoring s | questions/s | process s | load before | load after |",
              "|---|---:|---:|---:|---:|---|---|"]
    for row in report["runs"]:
        lines.append(f"| {row['run']} | {row['questions']} | {row['scoring_s']} | {row['questions_per_s']} | "
                     f"{row['process_s']} | {row['load_before']} | {row['load_after']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="cmmlu:0:,pubmedqa:0:", help="comma-separated benchmark:num_fewshot:limit")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="where eval outputs go (default: a temp dir)")
    parser.add_argument("extra", nargs="*", help="more eval_benchmarks.py flags after --")
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: the bench needs ../shared's CMMLU and PubMedQA files")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-eval-")
    report = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "model": args.model, "batch_size": args.batch_size,
              "environment": environment(), "runs": []}
    for spec in [s for s in args.runs.split(",") if s]:
        report["runs"].append(run_one(spec, args.model, args.batch_size, workdir, args.extra))
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"eval-{stamp}", "eval-latest"):
        (results / f"{name}.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (results / f"{name}.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()
