"""SFT-LoRA throughput and memory: this toolkit against LLaMA-Factory on the same job, one command.

    python bench/bench_sft.py --tool both --runs 2                 # the anchor job (256 samples, ~15 min a run on 2 cores)
    python bench/bench_sft.py --tool ours --samples 16 --runs 1    # a quick check of the harness
    python bench/bench_sft.py --variants ours:default,lf:fp32,lf:bf16,ours:fp32,ours:low_memory --samples 128 --runs 1

Variants (``tool:precision``; ``--tool`` alone means ``ours:fp32`` and/or ``lf:fp32``, the anchor job):
- ``ours:fp32``: ``--torch_dtype float32 --bf16 False`` (the plain fp32 run);
- ``ours:default``: no precision flag, i.e. what a user gets (bf16 on CPUs with AMX-BF16/AVX512-BF16, else fp32;
  the run's ``hardware:`` log line, recorded per run, says which);
- ``ours:bf16``: ``--torch_dtype bfloat16 --bf16 True`` forced; ``ours:low_memory``: ``--low_memory True``;
  ``ours:autocast``: fp32 weights under bf16 autocast (``--torch_dtype float32 --bf16 True``);
- ``lf:fp32``: LLaMA-Factory's default (``bf16: false``); ``lf:bf16``: ``bf16: true`` plus ``use_cpu: true`` (without
  it LLaMA-Factory 0.9.5 refuses bf16 on a CPU); ``lf:low_memory``: ``bf16``/``use_cpu`` + its gradient checkpointing.

The job (STACK-NOTES "measured anchor job"): SmolLM2-135M-Instruct in fp32, the first ``--samples`` conversations of
medical_sft_1K_format.jsonl, 512 tokens, batch 4, LoRA r8/alpha16/dropout 0.05 on all linear layers, 1 epoch,
lr 2e-4, no gradient checkpointing, no evaluation, no checkpoints. Each tool runs with its own defaults otherwise
(ours: packed rows, per-sequence attention, fused loss, fused LoRA branch, huge-page allocator, freed memory kept
by malloc; LLaMA-Factory: padded batches, PEFT's LoRA, PyTorch's and glibc's default allocators). Runs alternate between the
tools (ours, LF, LF, ours, ...) so that a change in machine load hits both.

Measured per run:
- supervised tokens = labels != -100 summed over the epoch's training data, counted in each tool's *own* tokenised
  data (ours: ``train_supervised_tokens`` in train_results.json; LLaMA-Factory: its saved ``tokenized_path`` dataset),
  so each tool is credited with what it really trains on. Both render the same ChatML text (our default is the
  tokenizer's chat template, LF's is its ``smollm2`` template: same system prompt and markers).
- total tokens = the real (non-padding) tokens of the same data.
- tokens/s = tokens / ``train_runtime`` (the trainer's training-loop time, excluding start-up and tokenisation).
- peak RSS = the largest sum of VmRSS over the whole process tree, sampled every 0.2 s.

LLaMA-Factory is installed on first use into bench/.venv-llamafactory (git-ignored; about 2 GB, a few minutes) with
torch pinned to the CPU build. Results: bench/results/sft-<time>.{json,md} and bench/results/sft-latest.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import environment, load_average  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
LF_VENV = BENCH / ".venv-llamafactory"
LF_PACKAGES = ["llamafactory==0.9.5", "torch==2.13.0"]  # torch pinned in the same command: the CPU build
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "medical-zh" / "sft" / "medical_sft_1K_format.jsonl"
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
JOB = dict(max_length=512, batch_size=4, lora_rank=8, lora_alpha=16, lora_dropout=0.05, epochs=1, learning_rate=2e-4,
           seed=42)
ENV = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           CUDA_VISIBLE_DEVICES="", DISABLE_VERSION_CHECK="1", USE_MODELSCOPE_HUB="0", WANDB_DISABLED="true")


# --- process-tree memory ---------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def tree_rss_bytes(pid: int) -> int:
    """Sum of VmRSS of ``pid`` and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        todo.extend(_children(current))
    return total


def run_measured(cmd: list[str], log_path: Path, cwd: Path, env: dict) -> dict:
    """Run ``cmd`` (stdout+stderr to ``log_path``); return rc, wall seconds and peak process-tree RSS."""
    peak = [0]
    with open(log_path, "w", encoding="utf-8") as log:
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
                done.wait(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rc = proc.wait()
        done.set()
        watcher.join()
    return {"rc": rc, "wall_s": round(time.time() - start, 1), "peak_rss_gb": round(peak[0] / 1e9, 3)}


# --- the two tools ---------------------------------------------------------------------------------------------------


def write_subset(data: Path, samples: int, directory: Path) -> tuple[Path, Path]:
    """The first ``samples`` records as ``directory/ours/sft.jsonl``, registered for LLaMA-Factory in ``directory/lf``."""
    (directory / "ours").mkdir(parents=True, exist_ok=True)
    (directory / "lf").mkdir(parents=True, exist_ok=True)
    lines = []
    with open(data, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                lines.append(line if line.endswith("\n") else line + "\n")
            if len(lines) == samples:
                break
    if len(lines) < samples:
        raise SystemExit(f"error: {data} has only {len(lines)} records, --samples {samples} asked for more")
    path = (directory / "ours" / "sft.jsonl").resolve()
    path.write_text("".join(lines), encoding="utf-8")
    # LLaMA-Factory's registry of the same file (ShareGPT from/value roles are its defaults); kept apart because our
    # loader reads every .json file of its directory
    (directory / "lf" / "dataset_info.json").write_text(json.dumps(
        {"bench": {"file_name": str(path), "formatting": "sharegpt", "columns": {"messages": "conversations"}}}))
    return directory / "ours", directory / "lf"


OURS_PRECISION = {"fp32": ["--torch_dtype", "float32", "--bf16", "False"], "default": [],
                  "bf16": ["--torch_dtype", "bfloat16", "--bf16", "True"], "low_memory": ["--low_memory", "True"],
                  "autocast": ["--torch_dtype", "float32", "--bf16", "True"]}
LF_PRECISION = {"fp32": {}, "bf16": {"bf16": True, "use_cpu": True},
                "low_memory": {"bf16": True, "use_cpu": True, "disable_gradient_checkpointing": False}}
TOOLS = {"ours": "ours", "lf": "llamafactory", "llamafactory": "llamafactory"}


def parse_variants(text: str, extra: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """``ours:default,lf:bf16`` -> [("ours", "default"), ("llamafactory", "bf16")], checked against the tables above
    (``extra``: a stage's own variants of ours, name -> flags)."""
    ours = {**OURS_PRECISION, **(extra or {})}
    variants = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        tool, _, precision = item.partition(":")
        tool = TOOLS.get(tool)
        table = ours if tool == "ours" else LF_PRECISION
        if tool is None or precision not in table:
            raise SystemExit(f"error: --variants: {item!r} is not one of "
                             f"{', '.join(['ours:' + k for k in ours] + ['lf:' + k for k in LF_PRECISION])}")
        variants.append((tool, precision))
    return variants


def label(tool: str, precision: str) -> str:
    return f"{'ours' if tool == 'ours' else 'lf'}:{precision}"


def ours_command(model: Path, data_dir: Path, out: Path, precision: str = "fp32") -> list[str]:
    return [sys.executable, str(ROOT / "supervised_finetuning.py"),
            "--model_name_or_path", str(model), "--train_file_dir", str(data_dir), "--output_dir", str(out),
            "--model_max_length", str(JOB["max_length"]), "--per_device_train_batch_size", str(JOB["batch_size"]),
            "--num_train_epochs", str(JOB["epochs"]), "--learning_rate", str(JOB["learning_rate"]),
            "--lora_rank", str(JOB["lora_rank"]), "--lora_alpha", str(JOB["lora_alpha"]),
            "--lora_dropout", str(JOB["lora_dropout"]), "--target_modules", "all", *OURS_PRECISION[precision],
            "--do_eval", "False", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "10",
            "--seed", str(JOB["seed"]), "--disable_tqdm", "True"]


def lf_config(model: Path, data_dir: Path, out: Path, precision: str = "fp32") -> dict:
    return {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": JOB["lora_rank"], "lora_alpha": JOB["lora_alpha"], "lora_dropout": JOB["lora_dropout"],
        "lora_target": "all", "dataset": "bench", "dataset_dir": str(data_dir), "template": "smollm2",
        "cutoff_len": JOB["max_length"], "overwrite_cache": True, "tokenized_path": str(out / "tokenized"),
        "output_dir": str(out / "model"), "overwrite_output_dir": True, "logging_steps": 10, "save_strategy": "no",
        "plot_loss": False, "report_to": "none", "per_device_train_batch_size": JOB["batch_size"],
        "gradient_accumulation_steps": 1, "learning_rate": JOB["learning_rate"], "num_train_epochs": JOB["epochs"],
        "bf16": False, "fp16": False, "disable_gradient_checkpointing": True, "seed": JOB["seed"],
        "disable_tqdm": True, **LF_PRECISION[precision],
    }


def ensure_llamafactory() -> Path:
    cli = LF_VENV / "bin" / "llamafactory-cli"
    if not cli.exists():
        print(f"installing LLaMA-Factory into {LF_VENV} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LF_VENV)], check=True)
        subprocess.run([str(LF_VENV / "bin" / "pip"), "install", *LF_PACKAGES], check=True)
        # pip pulls torchvision/torchaudio builds that do not load with the CPU torch 2.13 (torchvision: "operator
        # torchvision::nms does not exist", which breaks `import transformers`; torchaudio: its library does not
        # load, and no torchaudio for 2.13 exists). Text SFT needs neither, but LLaMA-Factory imports torchaudio at
        # start-up (data/mm_plugin.py), so an inert stand-in that fails only when audio is used replaces it.
        subprocess.run([str(LF_VENV / "bin" / "pip"), "uninstall", "-y", "torchvision", "torchaudio"], check=True)
        install_torchaudio_stub()
    elif not (lf_site_packages() / "torchaudio").exists():
        install_torchaudio_stub()
    return cli


def lf_site_packages() -> Path:
    return next((LF_VENV / "lib").glob("python3*/site-packages"))


def install_torchaudio_stub() -> None:
    stub = lf_site_packages() / "torchaudio"
    stub.mkdir(exist_ok=True)
    (stub / "__init__.py").write_text(
        '"""Bench stand-in: no torchaudio build loads with torch 2.13 (CPU); text SFT never uses audio."""\n\n\n'
        "def __getattr__(name):\n"
        "    raise AttributeError(f'torchaudio.{name}: torchaudio is a stand-in in this bench venv (no audio)')\n")


def count_lf_tokens(tokenized: Path) -> dict:
    """Tokens and supervised tokens of LLaMA-Factory's own tokenised training data (its saved tokenized_path)."""
    code = ("import json, sys; from datasets import load_from_disk; d = load_from_disk(sys.argv[1]); "
            "d = d['train'] if 'train' in d else d; "
            "print(json.dumps({'samples': len(d), 'tokens': sum(map(len, d['input_ids'])), "
            "'supervised_tokens': sum(sum(1 for x in l if x != -100) for l in d['labels'])}))")
    out = subprocess.run([str(LF_VENV / "bin" / "python"), "-c", code, str(tokenized)], capture_output=True,
                         text=True, check=True, env=dict(os.environ, **ENV))
    return json.loads(out.stdout.strip().splitlines()[-1])


def hardware_line(log: Path) -> str:
    """Our run's ``hardware:`` log line (the precision it chose and why)."""
    for line in log.read_text(errors="replace").splitlines():
        if "hardware: " in line:
            return line.split("hardware: ", 1)[1].strip()
    return ""


def launch(tool: str, run_dir: Path, job: list[str] | dict) -> tuple[dict, float]:
    """Run one tool in a fresh ``run_dir`` (ours: ``job`` is the command; LLaMA-Factory: its config), measured; return
    the measurement and the load average before it."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    env = dict(os.environ, **ENV, PYTHONPATH=str(ROOT))
    load_before = os.getloadavg()[0]
    if tool == "ours":
        return run_measured(job, run_dir / "log.txt", ROOT, env), load_before
    import yaml

    config = run_dir / "config.yaml"  # LLaMA-Factory 0.9.5 fails to read a .json config (json.load on a Path)
    config.write_text(yaml.safe_dump(job, sort_keys=False))
    cli = ensure_llamafactory()
    env.pop("PYTHONPATH")
    return run_measured([str(cli), "train", str(config)], run_dir / "log.txt", run_dir, env), load_before


def run_tool(tool: str, run_dir: Path, model: Path, data_dirs: tuple[Path, Path], precision: str = "fp32") -> dict:
    job = (ours_command(model, data_dirs[0], run_dir / "model", precision) if tool == "ours"
           else lf_config(model, data_dirs[1], run_dir, precision))
    measured, load_before = launch(tool, run_dir, job)
    results_file = run_dir / "model" / "train_results.json"
    result = {"tool": tool, "variant": label(tool, precision), **measured, "load_before": round(load_before, 1),
              "load_after": round(os.getloadavg()[0], 1)}
    if measured["rc"] != 0 or not results_file.is_file():
        tail = (run_dir / "log.txt").read_text(errors="replace")[-3000:]
        raise SystemExit(f"error: {tool} run failed (rc {measured['rc']}); log {run_dir / 'log.txt'}:\n{tail}")
    metrics = json.loads(results_file.read_text())
    if tool == "ours":
        result["hardware"] = hardware_line(run_dir / "log.txt")
        counts = {"samples": metrics["train_samples"], "tokens": metrics["train_tokens"],
                  "supervised_tokens": metrics["train_supervised_tokens"]}
    else:
        counts = count_lf_tokens(run_dir / "tokenized")
    runtime = metrics["train_runtime"]
    result.update(train_runtime_s=round(runtime, 1), train_loss=round(metrics.get("train_loss", float("nan")), 4),
                  **counts, supervised_tokens_per_s=round(counts["supervised_tokens"] * JOB["epochs"] / runtime, 2),
                  tokens_per_s=round(counts["tokens"] * JOB["epochs"] / runtime, 2))
    return result


# --- report ----------------------------------------------------------------------------------------------------------


def summarize(results: list[dict]) -> dict:
    """Medians per variant, and each variant's ratios to LLaMA-Factory's default fp32 run (``lf:fp32``)."""
    summary = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        summary[variant] = {key: round(statistics.median(r[key] for r in runs), 3) for key in
                            ("supervised_tokens_per_s", "tokens_per_s", "peak_rss_gb", "train_runtime_s", "train_loss")}
    base = summary.get("lf:fp32")
    if base:
        for variant, medians in summary.items():
            medians["vs_lf_fp32"] = {
                "supervised_tokens_per_s": round(medians["supervised_tokens_per_s"] / base["supervised_tokens_per_s"],
                                                 3),
                "tokens_per_s": round(medians["tokens_per_s"] / base["tokens_per_s"], 3),
                "peak_rss": round(medians["peak_rss_gb"] / base["peak_rss_gb"], 3)}
    return summary


def markdown(report: dict) -> str:
    head = ("| variant | run | train_runtime (s) | samples | supervised tokens | total tokens | supervised tok/s "
            "| total tok/s | peak RSS (GB) | wall (s) | load avg before/after | train loss |")
    lines = [f"SFT-LoRA bench, {report['started']}: {report['job']}", "", head, "|" + "---|" * 12]
    for i, r in enumerate(report["results"]):
        lines.append(f"| {r['variant']} | {i + 1} | {r['train_runtime_s']} | {r['samples']} | {r['supervised_tokens']} "
                     f"| {r['tokens']} | {r['supervised_tokens_per_s']} | {r['tokens_per_s']} | {r['peak_rss_gb']} "
                     f"| {r['wall_s']} | {r['load_before']}/{r['load_after']} | {r['train_loss']} |")
    lines += ["", "| medians | supervised tok/s | total tok/s | peak RSS (GB) | train loss | sup. tok/s vs lf:fp32 "
              "| RSS vs lf:fp32 |", "|---|---|---|---|---|---|---|"]
    for variant, s in report["summary"].items():
        ratios = s.get("vs_lf_fp32", {})
        lines.append(f"| {variant} | {s['supervised_tokens_per_s']} | {s['tokens_per_s']} | {s['peak_rss_gb']} "
                     f"| {s['train_loss']} | {ratios.get('supervised_tokens_per_s', '')}x "
                     f"| {ratios.get('peak_rss', '')}x |")
    precisions = sorted({r["hardware"] for r in report["results"] if r.get("hardware")})
    lines += [""] + [f"ours, hardware log line: {line}" for line in precisions]
    lines += ["", f"machine: {json.dumps(report['machine'])}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tool", choices=["ours", "llamafactory", "both"], default="both",
                        help="the anchor job in fp32: ours:fp32 and/or lf:fp32 (ignored when --variants is given)")
    parser.add_argument("--variants", default="", help="comma-separated tool:precision list, e.g. "
                        "ours:default,lf:fp32,lf:bf16 (see the module docstring)")
    parser.add_argument("--runs", type=int, default=2, help="runs per tool (alternating)")
    parser.add_argument("--samples", type=int, default=256, help="first N conversations of --data")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"error: no data file {args.data} (pass --data)")
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: no model in {args.model}: run `python prepare_model.py` (or pass --model)")
    tools = ["ours", "llamafactory"] if args.tool == "both" else [args.tool]
    variants = parse_variants(args.variants) if args.variants else [(tool, "fp32") for tool in tools]
    if any(tool == "llamafactory" for tool, _ in variants):
        ensure_llamafactory()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.results / f"work-{stamp}"
    data_dirs = tuple(d.resolve() for d in write_subset(args.data, args.samples, work / "data"))
    report = {"started": stamp, "job": dict(JOB, samples=args.samples, model=str(args.model), data=str(args.data)),
              "machine": environment(), "results": []}
    for run in range(args.runs):
        order = variants if run % 2 == 0 else variants[::-1]
        for tool, precision in order:
            print(f"run {run + 1}/{args.runs}: {label(tool, precision)} ...", flush=True)
            result = run_tool(tool, work / f"{tool}-{precision}-{run + 1}", args.model.resolve(), data_dirs, precision)
            print(json.dumps(result), flush=True)
            report["results"].append(result)
    report["summary"] = summarize(report["results"])
    report["machine"]["uptime_end"] = load_average()
    args.results.mkdir(parents=True, exist_ok=True)
    for name in (f"sft-{stamp}", "sft-latest"):
        (args.results / f"{name}.json").write_text(json.dumps(report, indent=2))
        (args.results / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"logs and outputs of each run: {work}")


if __name__ == "__main__":
    main()
