"""Peak memory (RSS) of ORPO / SimPO (no reference model) vs DPO (frozen reference copy) on the same pairs and model.

    python bench/bench_orpo_memory.py                        # full training: dpo, orpo, simpo, alternating, 2 rounds
    python bench/bench_orpo_memory.py --methods dpo orpo --rounds 3 --lora

Uses bench_dpo_memory's ~34M-parameter Llama and random pairs. Each run is a fresh subprocess reporting its own
``ru_maxrss`` and its RSS after the imports; methods alternate within a round (A B C A B C) so a drift in machine
load affects each alike. With full training DPO holds a frozen reference copy of the weights; ORPO/SimPO do not, so
the model-dependent part (peak minus the import baseline) should be about one weight copy smaller (of ~5: weights,
gradients, two AdamW moments, reference). With LoRA (``--lora``) DPO's reference is the base with the adapter
disabled, so the three should be close. Prints load (uptime) and CPU model next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo_memory import build_model, rss_mb, write_pairs  # noqa: E402
from machine import environment  # noqa: E402

METHODS = {"dpo": ("dpo_training.py", []), "orpo": ("orpo_training.py", []),
           "simpo": ("orpo_training.py", ["--loss_type", "simpo"])}


def child(script: str, args: list[str]) -> None:
    """Run one training job in this process and print its memory as JSON on the last line."""
    sys.path.insert(0, str(ROOT))
    import importlib

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    module = importlib.import_module(script.removesuffix(".py"))
    after_import = rss_mb()
    trainer = module.main(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    runtime = next(h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h)
    print(json.dumps({"import_rss_mb": after_import, "peak_rss_mb": peak, "train_runtime_s": runtime}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help="LoRA instead of full training")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child is not None:
        child(options.child[0], options.child[1:])
        return

    print(f"environment: {json.dumps(environment())}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = build_model(work / "model", options.hidden, options.layers, options.vocab)
        write_pairs(work / "data" / "pairs.jsonl", 32)
        print(f"model: Llama {options.layers} layers x {options.hidden} hidden, vocab {options.vocab}: "
              f"{params / 1e6:.1f}M parameters ({params * 4 / 2**20:.0f} MiB in fp32); {options.steps} steps of "
              f"{options.batch} pairs, {'LoRA' if options.lora else 'full training'}")
        results: dict[str, list[dict]] = {m: [] for m in options.methods}
        for round_ in range(options.rounds):
            for method in options.methods:
                script, extra = METHODS[method]
                job = ["--model_name_or_path", str(work / "model"), "--train_file_dir", str(work / "data"),
                       "--output_dir", str(work / f"out-{method}-{round_}"), "--model_max_length", "256",
                       "--per_device_train_batch_size", str(options.batch), "--max_steps", str(options.steps),
                       "--learning_rate", "1e-4", "--save_strategy", "no", "--report_to", "none", "--do_eval", "False",
                       "--disable_tqdm", "True", "--use_peft", str(options.lora), *extra]
                env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
                proc = subprocess.run([sys.executable, __file__, "--child", script, *job], capture_output=True,
                                      text=True, env=env)
                if proc.returncode != 0:
                    sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results[method].append(r)
                print(f"round {round_ + 1} {method:6s} peak RSS {r['peak_rss_mb']:7.0f} MiB   after imports "
                      f"{r['import_rss_mb']:6.0f} MiB   training part {r['peak_rss_mb'] - r['import_rss_mb']:6.0f} MiB"
                      f"   train {r['train_runtime_s']:.1f} s   load {os.getloadavg()[0]:.1f}", flush=True)
        if "dpo" in results:
            def part(r: dict) -> float:
                return r["peak_rss_mb"] - r["import_rss_mb"]

            base_peak = sorted(r["peak_rss_mb"] for r in results["dpo"])[len(results["dpo"]) // 2]
            base_part = sorted(part(r) for r in results["dpo"])[len(results["dpo"]) // 2]
            for method, runs in results.items():
                if method == "dpo":
                    continue
                peak = sorted(r["peak_rss_mb"] for r in runs)[len(runs) // 2]
                mid = sorted(part(r) for r in runs)[len(runs) // 2]
                print(f"{method} / dpo (medians): peak RSS x{peak / base_peak:.2f} ({peak - base_peak:+.0f} MiB), "
                      f"training part x{mid / base_part:.2f}")


if __name__ == "__main__":
    main()
