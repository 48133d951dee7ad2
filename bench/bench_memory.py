"""Peak memory of our SFT job: the plain fp32 run vs ``--low_memory`` (and any other flag sets), alternating.

    python bench/bench_memory.py                                  # 64 samples, fp32 vs --low_memory, 1 run each
    python bench/bench_memory.py --max_steps 4 --runs 2           # shorter: peak RSS is reached in the first steps

The job is bench/bench_sft.py's (SmolLM2-135M-Instruct, the first --samples conversations of
medical_sft_1K_format.jsonl, 512 tokens, batch 4, LoRA r8 on all linear layers, 1 epoch, no eval, no checkpoints),
run by supervised_finetuning.py in a child process; peak RSS = the largest VmRSS sum over the process tree, sampled
every 0.2 s. Writes bench/results/memory-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sft import DEFAULT_DATA, DEFAULT_MODEL, ENV, JOB, ROOT, run_measured, write_subset  # noqa: E402
from machine import environment  # noqa: E402

MODES = {
    "fp32": ["--torch_dtype", "float32", "--bf16", "False"],
    "low_memory": ["--low_memory"],
}


def command(model: Path, data_dir: Path, out: Path, flags: list[str], max_steps: int | None) -> list[str]:
    cmd = [sys.executable, str(ROOT / "supervised_finetuning.py"),
           "--model_name_or_path", str(model), "--train_file_dir", str(data_dir), "--output_dir", str(out),
           "--model_max_length", str(JOB["max_length"]), "--per_device_train_batch_size", str(JOB["batch_size"]),
           "--num_train_epochs", str(JOB["epochs"]), "--learning_rate", str(JOB["learning_rate"]),
           "--lora_rank", str(JOB["lora_rank"]), "--lora_alpha", str(JOB["lora_alpha"]),
           "--lora_dropout", str(JOB["lora_dropout"]), "--target_modules", "all",
           "--do_eval", "False", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
           "--seed", str(JOB["seed"]), "--disable_tqdm", "True", *flags]
    if max_steps:
        cmd += ["--max_steps", str(max_steps)]
    return cmd


def train_metrics(out: Path) -> dict:
    path = out / "train_results.json"
    if not path.exists():
        return {}
    metrics = json.loads(path.read_text())
    keep = ("train_runtime", "train_loss", "train_tokens_per_second", "train_supervised_tokens_per_second")
    return {k: metrics[k] for k in keep if k in metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max_steps", type=int, default=None)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--modes", default="fp32,low_memory")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=FLAGS",
                        help='another mode, e.g. --extra "bf16=--torch_dtype bfloat16 --bf16 True"')
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    modes = {name: MODES[name] for name in args.modes.split(",") if name}
    for extra in args.extra:
        name, flags = extra.split("=", 1)
        modes[name] = shlex.split(flags)
    record: dict = {"environment": environment(), "job": dict(JOB, samples=args.samples, max_steps=args.max_steps),
                    "modes": {name: " ".join(flags) for name, flags in modes.items()}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, _ = write_subset(args.data, args.samples, Path(tmp) / "data")
        for run in range(args.runs):
            for name, flags in modes.items():
                out = Path(tmp) / f"out-{name}-{run}"
                result = run_measured(command(args.model, data_dir, out, flags, args.max_steps), Path(tmp) / "log.txt",
                                      ROOT, dict(os.environ, **ENV))
                log = (Path(tmp) / "log.txt").read_text(errors="replace")
                hardware = [line.split("hardware: ", 1)[1] for line in log.splitlines() if "hardware: " in line]
                result.update(mode=name, run=run, hardware=hardware[:1], **train_metrics(out))
                if result["rc"]:
                    result["log_tail"] = log[-2000:]
                record["runs"].append(result)
                print(json.dumps(result), flush=True)
    record["environment"]["uptime_end"] = environment()["uptime"]
    path = ROOT / "bench" / "results" / f"memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"environment: {json.dumps(record['environment'])}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
