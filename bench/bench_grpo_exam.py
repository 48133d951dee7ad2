"""GRPO on exam questions, measured with the evaluation stage: does the accuracy reward move a small model?

    python bench/bench_grpo_exam.py                                  # defaults below (~15 min on 2 cores)
    python bench/bench_grpo_exam.py --steps 48 --learning_rate 2e-4

Trains a LoRA adapter on SmolLM2-135M-Instruct with ``grpo_training.py`` on the first ``--train_questions`` CMMLU
anatomy questions of ../shared (accuracy reward only; the system prompt asks for the answer letter alone, so the
completions are short and every one is scored), then scores the base model and the unmerged adapter with
``eval_benchmarks.py`` on the remaining anatomy questions (never trained on), 0-shot, chat template on with the same
system prompt. Records the per-step rewards, the held-out accuracies, the CPU model and flags, the thread count and the
load. Writes bench/results/grpo-exam-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import environment  # noqa: E402

SHARED_CSV = ROOT.parent / "shared" / "data" / "eval" / "cmmlu_medical" / "test" / "anatomy.csv"
SYSTEM = "Answer the multiple-choice question with the letter of the correct option only (A, B, C or D)."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--train_questions", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--questions_per_step", type=int, default=2)
    parser.add_argument("--max_completion_length", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if not SHARED_CSV.is_file():
        raise SystemExit(f"{SHARED_CSV} is absent: the bench needs ../shared's CMMLU anatomy questions")
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import eval_benchmarks
    import grpo_training

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-grpo-"))
    lines = SHARED_CSV.read_text(encoding="utf-8").splitlines()
    n = args.train_questions
    (work / "train").mkdir(parents=True, exist_ok=True)
    (work / "train" / "anatomy_train.csv").write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    (work / "held_out").mkdir(exist_ok=True)
    (work / "held_out" / "anatomy.csv").write_text("\n".join(lines[:1] + lines[n + 1:]) + "\n", encoding="utf-8")
    report = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(), "args": vars(args),
              "system_prompt": SYSTEM, "load_before": os.getloadavg()}
    start = time.perf_counter()
    trainer = grpo_training.main([
        "--model_name_or_path", args.model, "--train_file_dir", str(work / "train"), "--output_dir",
        str(work / "grpo"), "--overwrite_output_dir", "True", "--reward_funcs", "accuracy", "--system_prompt", SYSTEM,
        "--num_generations", str(args.num_generations),
        "--per_device_train_batch_size", str(args.num_generations * args.questions_per_step),
        "--max_completion_length", str(args.max_completion_length), "--max_steps", str(args.steps),
        "--learning_rate", str(args.learning_rate), "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "True", "--seed", "0"])
    report["train_s"] = round(time.perf_counter() - start, 1)
    logged = [e for e in trainer.state.log_history if "rewards/accuracy/mean" in e]
    report["accuracy_reward_per_step"] = [round(e["rewards/accuracy/mean"], 4) for e in logged]
    half = len(logged) // 2
    report["accuracy_reward_first_half"] = sum(report["accuracy_reward_per_step"][:half]) / max(half, 1)
    report["accuracy_reward_second_half"] = sum(report["accuracy_reward_per_step"][half:]) / max(len(logged) - half, 1)
    report["held_out"] = {}
    for name, adapter in (("base", []), ("grpo", ["--lora_model", str(work / "grpo")])):
        result = eval_benchmarks.main([
            "--model_name_or_path", args.model, *adapter, "--benchmark_dir", str(work / "held_out"), "--output_dir",
            str(work / f"eval-{name}"), "--overwrite_output_dir", "True", "--chat_template", "True",
            "--system_prompt", SYSTEM])
        row = result["subjects"]["anatomy"]
        report["held_out"][name] = {k: row[k] for k in ("n", "acc", "acc_stderr", "acc_norm")}
    report["load_after"] = os.getloadavg()
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"grpo-exam-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("accuracy_reward_per_step", "accuracy_reward_first_half",
                                              "accuracy_reward_second_half", "held_out", "train_s")}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
