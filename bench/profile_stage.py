"""Where one training step of a stage spends its time: torch.profiler over one step of the stage's own script.

    python bench/profile_stage.py --stage dpo --step 2 -- --model_name_or_path models/SmolLM2-135M-Instruct \\
        --train_file_dir DIR --output_dir /tmp/prof --per_device_train_batch_size 2 --max_steps 3 ...

Everything after ``--`` goes to the stage's ``main`` unchanged. The Trainer's ``training_step`` is wrapped (here
only) so that step ``--step`` (1-based; the first is warm-up) runs under ``torch.profiler``; the top ops by self CPU
time are printed with their share. Prints the CPU record of bench/machine.py; compare shares, not seconds, across
machines.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_precision import top_ops  # noqa: E402
from machine import environment  # noqa: E402

SCRIPTS = {"pt": "pretraining", "sft": "supervised_finetuning", "rm": "reward_modeling", "dpo": "dpo_training",
           "orpo": "orpo_training", "kto": "kto_training", "grpo": "grpo_training", "ppo": "ppo_training"}


def main() -> None:
    argv = sys.argv[1:]
    stage_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(SCRIPTS), required=True)
    parser.add_argument("--step", type=int, default=2, help="which training step to profile (1-based)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--shapes", type=int, default=0, help="also list the N costliest ops by input shape")
    args = parser.parse_args(own)

    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    original = transformers.Trainer.training_step
    seen, result = [0], {}

    def training_step(self, *a, **k):
        seen[0] += 1
        if seen[0] != args.step:
            return original(self, *a, **k)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes > 0) as prof:
            out = original(self, *a, **k)
        result["events"] = prof.key_averages()
        if args.shapes:
            result["shapes"] = prof.key_averages(group_by_input_shape=True)
        return out

    transformers.Trainer.training_step = training_step
    try:
        importlib.import_module(SCRIPTS[args.stage]).main(stage_args)
    finally:
        transformers.Trainer.training_step = original
    if "events" not in result:
        raise SystemExit(f"error: the run took {seen[0]} training steps, fewer than --step {args.step}")
    top_ops(result["events"], f"\nprofile of {args.stage} step {args.step} (torch threads {torch.get_num_threads()})",
            args.top)
    if args.shapes:
        print(f"\nthe {args.shapes} costliest ops by input shape:")
        for event in sorted(result["shapes"], key=lambda e: -e.self_cpu_time_total)[:args.shapes]:
            print(f"  {event.key[:40]:40} {event.count:6d} calls {event.self_cpu_time_total / 1000:9.1f} ms  "
                  f"{event.input_shapes}")
    print(f"environment: {json.dumps(environment())}")


if __name__ == "__main__":
    main()
