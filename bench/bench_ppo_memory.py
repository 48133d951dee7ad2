"""Peak memory (RSS) of LoRA-PPO vs full-PPO on the same ~34M-parameter Llama built from a config.

    python bench/bench_ppo_memory.py                  # lora, full; prints the ratio
    python bench/bench_ppo_memory.py --steps 4 --hidden 768

A full-training reward model is trained for one step by reward_modeling.py on random pairs (its scores are
meaningless; only memory is measured), then each PPO mode runs in a fresh subprocess that reports its own
``ru_maxrss`` and its RSS after the imports. Models in memory:

- LoRA: the policy weights once (the reference is the same weights with the adapter disabled), the value model
  (initialised from the reward model, frozen, with its own adapter) and the reward model: 3 weight copies, plus
  adapter-sized gradients and AdamW moments.
- full: the policy, its gradients and two AdamW moments, a frozen reference copy, the value model with its
  gradients and moments, and the reward model: about 10 weight copies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo_memory import ROOT, WORDS, build_model, rss_mb, write_pairs  # noqa: E402
from machine import environment  # noqa: E402

MODES = {"lora": [], "full": ["--use_peft", "False"]}


def write_prompts(path: Path, n: int) -> None:
    rng = random.Random(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps({"conversations": [{"from": "human", "value": " ".join(rng.choices(WORDS, k=40))},
                                                   {"from": "gpt", "value": "ok"}]}) + "\n")


def child(args: list[str]) -> None:
    """Run one PPO job in this process and print its memory as JSON on the last line."""
    sys.path.insert(0, str(ROOT))
    import time

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    import ppo_training

    after_import = rss_mb()
    started = time.time()
    ppo_training.main(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"import_rss_mb": after_import, "peak_rss_mb": peak, "run_s": time.time() - started}))


def run(command: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed:\n{proc.stderr[-3000:]}")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rollout_batch_size", type=int, default=8)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child is not None:
        child(options.child)
        return

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = build_model(work / "model", options.hidden, options.layers, options.vocab)
        write_pairs(work / "pairs" / "pairs.jsonl", 8)
        write_prompts(work / "prompts" / "prompts.jsonl", 32)
        run([sys.executable, str(ROOT / "reward_modeling.py"), "--model_name_or_path", str(work / "model"),
             "--train_file_dir", str(work / "pairs"), "--output_dir", str(work / "rm"), "--use_peft", "False",
             "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
             "--do_eval", "False", "--model_max_length", "256"], env)
        print(f"model: Llama {options.layers} layers x {options.hidden} hidden, vocab {options.vocab}: "
              f"{params / 1e6:.1f}M parameters ({params * 4 / 2**20:.0f} MiB in fp32); {options.steps} PPO updates "
              f"of {options.rollout_batch_size} rollouts x 32 new tokens")
        print(f"environment: {json.dumps(environment())}")
        results = {}
        for mode in options.modes:
            job = ["--model_name_or_path", str(work / "model"), "--reward_model_name_or_path", str(work / "rm"),
                   "--train_file_dir", str(work / "prompts"), "--output_dir", str(work / f"out-{mode}"),
                   "--max_steps", str(options.steps), "--rollout_batch_size", str(options.rollout_batch_size),
                   "--num_mini_batches", "2", "--max_new_tokens", "32", "--save_strategy", "no",
                   "--report_to", "none", *MODES[mode]]
            proc = run([sys.executable, __file__, "--child", *job], env)
            results[mode] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{mode:6s} peak RSS {r['peak_rss_mb']:7.0f} MiB   after imports {r['import_rss_mb']:6.0f} MiB   "
                  f"training part {r['peak_rss_mb'] - r['import_rss_mb']:6.0f} MiB   run {r['run_s']:.1f} s")
        if {"lora", "full"} <= results.keys():
            lora, full = results["lora"], results["full"]
            raw = full["peak_rss_mb"] / lora["peak_rss_mb"]
            part = (full["peak_rss_mb"] - full["import_rss_mb"]) / (lora["peak_rss_mb"] - lora["import_rss_mb"])
            print(f"full / lora: peak RSS x{raw:.2f}, training part x{part:.2f}")


if __name__ == "__main__":
    main()
