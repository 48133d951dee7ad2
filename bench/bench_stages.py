"""DPO-, RM- and PT-LoRA throughput and memory: this toolkit against LLaMA-Factory on the same job, one command.

    python bench/bench_stages.py --stage dpo --variants ours:default,lf:fp32,ours:fp32,lf:bf16 --pairs 100
    python bench/bench_stages.py --stage rm --pairs 100
    python bench/bench_stages.py --stage pt --lines 100
    python bench/bench_stages.py --stage dpo --pairs 4 --variants ours:fp32,lf:fp32   # a quick check of the harness

The jobs (issue 27), SmolLM2-135M-Instruct, LoRA r8/alpha16/dropout 0.05 on all linear layers, 1 epoch, no gradient
checkpointing, no evaluation, no checkpoints, seed 42:

- ``dpo``: the first ``--pairs`` records of dpo_zh_500.jsonl whose prompt + longer reply fit in 480 tokens of the
  model's chat template (so that neither tool cuts or drops a pair and both train on the same tokens: the tools cut
  over-long pairs differently, and our reward model drops rather than cuts them), 512 tokens, batch 2, lr 5e-5, beta
  0.1, sigmoid loss; the LoRA reference is the base with the adapter off in both.
- ``rm``: the same pairs, 512 tokens, batch 2, lr 5e-5 (pairwise loss on a scalar head).
- ``pt``: the first ``--lines`` lines of fever.txt, documents ended with EOS and packed into 512-token blocks, batch 4,
  lr 2e-4.

Each tool runs with its own defaults otherwise. LLaMA-Factory reads the pairs in its ShareGPT "ranking" layout (the same
texts, ``chosen``/``rejected`` as messages; converted by this script) and the text file through its registry.

Measured per run: samples (pairs, or blocks) and samples/s from the trainer's own ``train_samples_per_second``, the
trainer's ``train_runtime`` (the loop, excluding start-up and tokenisation), the final train loss, the peak RSS of
the whole process tree (sampled every 0.2 s), load before/after. Variants and the LLaMA-Factory venv as in
bench/bench_sft.py (``ours:default`` = no precision flag: bf16 on CPUs with AMX-BF16/AVX512-BF16). Results:
bench/results/<stage>-<time>.{json,md} and <stage>-latest.{json,md}; the machine record of bench/machine.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sft import (BENCH, DEFAULT_MODEL, JOB, LF_PRECISION, OURS_PRECISION, ROOT,  # noqa: E402
                       ensure_llamafactory, hardware_line, label, launch, parse_variants)
from machine import environment, load_average  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "medical-zh"
PAIRS = SHARED / "reward" / "dpo_zh_500.jsonl"
TEXT = SHARED / "pretrain" / "fever.txt"
STAGES = {
    "dpo": dict(script="dpo_training.py", lf_stage="dpo", batch_size=2, learning_rate=5e-5,
                length_flag="--model_max_length"),
    "rm": dict(script="reward_modeling.py", lf_stage="rm", batch_size=2, learning_rate=5e-5,
               length_flag="--model_max_length"),
    "pt": dict(script="pretraining.py", lf_stage="pt", batch_size=4, learning_rate=2e-4, length_flag="--block_size"),
}


FIT = 480  # tokens a selected pair may take (prompt + the longer reply, chat template), below the job's 512


def fitting_pairs(count: int, model: Path) -> list[str]:
    """The first ``count`` lines of dpo_zh_500.jsonl whose prompt + longer reply fit in :data:`FIT` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    kept = []
    with open(PAIRS, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            turns = [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]
            longest = max(len(tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": record[k]}],
                                                            tokenize=True, return_dict=True)["input_ids"])
                          for k in ("chosen", "rejected"))
            if longest <= FIT:
                kept.append(line)
                if len(kept) == count:
                    return kept
    raise SystemExit(f"error: only {len(kept)} pairs of {PAIRS} fit in {FIT} tokens, {count} asked for")


def write_data(stage: str, count: int, directory: Path, model: Path) -> tuple[Path, Path]:
    """The job's pairs (or lines) as ``directory/ours/...`` and, in LLaMA-Factory's layout, ``directory/lf``."""
    ours, lf = directory / "ours", directory / "lf"
    ours.mkdir(parents=True, exist_ok=True)
    lf.mkdir(parents=True, exist_ok=True)
    if stage == "pt":
        with open(TEXT, encoding="utf-8") as fh:
            lines = [line for line in fh if line.strip()][:count]
        if len(lines) < count:
            raise SystemExit(f"error: {TEXT} has only {len(lines)} non-empty lines, {count} asked for")
    else:
        lines = fitting_pairs(count, model)
    if stage == "pt":
        text = (ours / "fever.txt").resolve()
        text.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines), encoding="utf-8")
        info = {"bench": {"file_name": str(text), "columns": {"prompt": "text"}}}
    else:
        pairs = (ours / "pairs.jsonl").resolve()
        pairs.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines), encoding="utf-8")
        records = []
        for line in lines:
            record = json.loads(line)
            records.append({"conversations": record["conversations"],
                            "chosen": {"from": "gpt", "value": record["chosen"]},
                            "rejected": {"from": "gpt", "value": record["rejected"]}})
        converted = (lf / "pairs_lf.json").resolve()
        converted.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        info = {"bench": {"file_name": str(converted), "formatting": "sharegpt", "ranking": True,
                          "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}
    (lf / "dataset_info.json").write_text(json.dumps(info))
    return ours, lf


# Stage-only variants of ours: DPO without the shared-prompt rows (TRL's padded chosen/rejected rows)
STAGE_VARIANTS = {"dpo": {"fp32_padded": OURS_PRECISION["fp32"] + ["--shared_prompt", "False"],
                          "default_padded": OURS_PRECISION["default"] + ["--shared_prompt", "False"]}}


def ours_command(stage: str, model: Path, data_dir: Path, out: Path, precision: str) -> list[str]:
    spec = STAGES[stage]
    flags = STAGE_VARIANTS.get(stage, {}).get(precision) or OURS_PRECISION[precision]
    return [sys.executable, str(ROOT / spec["script"]),
            "--model_name_or_path", str(model), "--train_file_dir", str(data_dir), "--output_dir", str(out),
            spec["length_flag"], str(JOB["max_length"]), "--per_device_train_batch_size", str(spec["batch_size"]),
            "--num_train_epochs", str(JOB["epochs"]), "--learning_rate", str(spec["learning_rate"]),
            "--lora_rank", str(JOB["lora_rank"]), "--lora_alpha", str(JOB["lora_alpha"]),
            "--lora_dropout", str(JOB["lora_dropout"]), "--target_modules", "all", *flags,
            "--validation_split_percentage", "0", "--do_eval", "False", "--eval_strategy", "no",
            "--save_strategy", "no", "--report_to", "none", "--logging_steps", "10", "--seed", str(JOB["seed"]),
            "--disable_tqdm", "True"]


def lf_config(stage: str, model: Path, data_dir: Path, out: Path, precision: str) -> dict:
    spec = STAGES[stage]
    return {
        "model_name_or_path": str(model), "stage": spec["lf_stage"], "do_train": True, "finetuning_type": "lora",
        "lora_rank": JOB["lora_rank"], "lora_alpha": JOB["lora_alpha"], "lora_dropout": JOB["lora_dropout"],
        "lora_target": "all", "dataset": "bench", "dataset_dir": str(data_dir), "template": "smollm2",
        "cutoff_len": JOB["max_length"], "overwrite_cache": True, "output_dir": str(out / "model"),
        "overwrite_output_dir": True, "logging_steps": 10, "save_strategy": "no", "plot_loss": False,
        "report_to": "none", "per_device_train_batch_size": spec["batch_size"], "gradient_accumulation_steps": 1,
        "learning_rate": spec["learning_rate"], "num_train_epochs": JOB["epochs"], "bf16": False, "fp16": False,
        "disable_gradient_checkpointing": True, "seed": JOB["seed"], "disable_tqdm": True,
        **({"pref_beta": 0.1, "pref_loss": "sigmoid"} if stage == "dpo" else {}), **LF_PRECISION[precision],
    }


def run_tool(stage: str, tool: str, precision: str, run_dir: Path, model: Path, data_dirs: tuple[Path, Path]) -> dict:
    job = (ours_command(stage, model, data_dirs[0], run_dir / "model", precision) if tool == "ours"
           else lf_config(stage, model, data_dirs[1], run_dir, precision))
    measured, load_before = launch(tool, run_dir, job)
    results_file = run_dir / "model" / "train_results.json"
    result = {"stage": stage, "tool": tool, "variant": label(tool, precision), **measured,
              "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1)}
    if measured["rc"] != 0 or not results_file.is_file():
        tail = (run_dir / "log.txt").read_text(errors="replace")[-3000:]
        raise SystemExit(f"error: {result['variant']} run failed (rc {measured['rc']}); "
                         f"log {run_dir / 'log.txt'}:\n{tail}")
    metrics = json.loads(results_file.read_text())
    runtime = metrics["train_runtime"]
    samples = round(metrics["train_samples_per_second"] * runtime / JOB["epochs"])
    if tool == "ours":
        result["hardware"] = hardware_line(run_dir / "log.txt")
    result.update(train_runtime_s=round(runtime, 1), samples=samples,
                  samples_per_s=round(metrics["train_samples_per_second"], 4),
                  train_loss=round(metrics.get("train_loss", float("nan")), 4))
    if stage == "pt":
        result["tokens_per_s"] = round(samples * JOB["max_length"] * JOB["epochs"] / runtime, 1)
    return result


def summarize(results: list[dict]) -> dict:
    """Medians per variant, and each variant's ratios to LLaMA-Factory's default fp32 run (``lf:fp32``)."""
    summary = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        summary[variant] = {key: round(statistics.median(r[key] for r in runs), 4)
                            for key in ("samples_per_s", "peak_rss_gb", "train_runtime_s", "train_loss")}
    base = summary.get("lf:fp32")
    if base:
        for medians in summary.values():
            medians["vs_lf_fp32"] = {"samples_per_s": round(medians["samples_per_s"] / base["samples_per_s"], 3),
                                     "peak_rss": round(medians["peak_rss_gb"] / base["peak_rss_gb"], 3)}
    return summary


def markdown(report: dict) -> str:
    unit = "blocks" if report["stage"] == "pt" else "pairs"
    lines = [f"{report['stage'].upper()}-LoRA bench, {report['started']}: {json.dumps(report['job'])}", "",
             f"| variant | run | train_runtime (s) | {unit} | {unit}/s | peak RSS (GB) | wall (s) | load before/after "
             "| train loss |", "|" + "---|" * 9]
    for i, r in enumerate(report["results"]):
        lines.append(f"| {r['variant']} | {i + 1} | {r['train_runtime_s']} | {r['samples']} | {r['samples_per_s']} "
                     f"| {r['peak_rss_gb']} | {r['wall_s']} | {r['load_before']}/{r['load_after']} "
                     f"| {r['train_loss']} |")
    lines += ["", f"| medians | {unit}/s | peak RSS (GB) | train loss | {unit}/s vs lf:fp32 | RSS vs lf:fp32 |",
              "|---|---|---|---|---|---|"]
    for variant, s in report["summary"].items():
        ratios = s.get("vs_lf_fp32", {})
        lines.append(f"| {variant} | {s['samples_per_s']} | {s['peak_rss_gb']} | {s['train_loss']} "
                     f"| {ratios.get('samples_per_s', '')}x | {ratios.get('peak_rss', '')}x |")
    lines += [""] + [f"ours, hardware log line: {line}"
                     for line in sorted({r["hardware"] for r in report["results"] if r.get("hardware")})]
    lines += ["", f"machine: {json.dumps(report['machine'])}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=sorted(STAGES), required=True)
    parser.add_argument("--variants", default="ours:default,lf:fp32,ours:fp32",
                        help="comma-separated tool:precision list (see bench/bench_sft.py)")
    parser.add_argument("--runs", type=int, default=1, help="rounds of the variants (alternating order)")
    parser.add_argument("--pairs", type=int, default=100,
                        help=f"dpo/rm: first N pairs of dpo_zh_500.jsonl that fit {FIT} tokens (102 do, SmolLM2)")
    parser.add_argument("--lines", type=int, default=100, help="pt: first N lines of fever.txt")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    source = TEXT if args.stage == "pt" else PAIRS
    if not source.is_file():
        raise SystemExit(f"error: no data file {source} (../shared is needed)")
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: no model in {args.model}: run `python prepare_model.py` (or pass --model)")
    variants = parse_variants(args.variants, extra=STAGE_VARIANTS.get(args.stage))
    if any(tool == "llamafactory" for tool, _ in variants):
        ensure_llamafactory()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.results / f"work-{args.stage}-{stamp}"
    count = args.lines if args.stage == "pt" else args.pairs
    data_dirs = tuple(d.resolve() for d in write_data(args.stage, count, work / "data", args.model))
    spec = STAGES[args.stage]
    report = {"stage": args.stage, "started": stamp, "machine": environment(), "results": [],
              "job": {"data": str(source), ("lines" if args.stage == "pt" else f"pairs fitting {FIT} tokens"): count,
                      "length": JOB["max_length"], "batch_size": spec["batch_size"],
                      "learning_rate": spec["learning_rate"], "lora": "r8/alpha16/dropout0.05 all linear",
                      "epochs": JOB["epochs"], "model": str(args.model)}}
    for run in range(args.runs):
        for tool, precision in (variants if run % 2 == 0 else variants[::-1]):
            print(f"run {run + 1}/{args.runs}: {args.stage} {label(tool, precision)} ...", flush=True)
            result = run_tool(args.stage, tool, precision, work / f"{tool}-{precision}-{run + 1}",
                              args.model.resolve(), data_dirs)
            print(json.dumps(result), flush=True)
            report["results"].append(result)
    report["summary"] = summarize(report["results"])
    report["machine"]["uptime_end"] = load_average()
    args.results.mkdir(parents=True, exist_ok=True)
    for name in (f"{args.stage}-{stamp}", f"{args.stage}-latest"):
        (args.results / f"{name}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        (args.results / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"logs and outputs of each run: {work}")


if __name__ == "__main__":
    main()
