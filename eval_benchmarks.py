"""Benchmark accuracy of any model the stages produce (base, merged, or base + LoRA adapter), with lm-eval.

    python eval_benchmarks.py --model_name_or_path models/SmolLM2-135M-Instruct \
        --benchmark_dir data/eval --output_dir outputs-eval --limit 20
    python eval_benchmarks.py --model_name_or_path outputs-pipeline/sft-merged --lora_model outputs-pipeline/dpo \
        --benchmark_dir ../shared/data/eval/cmmlu_medical --output_dir outputs-eval-dpo --num_fewshot 5 \
        --train_file_dir data/sft,data/reward --log_samples

The benchmark dir holds CMMLU-layout CSVs, generic multiple-choice JSONL and/or PubMedQA json (see
medtrain/benchmarks.py and docs/evaluation.md). Every file is checked before anything is written; then
OUT/data + OUT/tasks hold the normalised questions and lm-eval task YAMLs, and OUT/results.json, OUT/results.md,
OUT/lm_eval_results.json, OUT/logs (tensorboard) and, with --log_samples, OUT/samples.jsonl the results.
OUT/reproduce.sh is the plain `lm_eval` command that gives the same numbers.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

from medtrain import evaluation
from medtrain.arguments import flag_spelling, parse_args
from medtrain.benchmarks import check_fewshot, load_benchmarks, select_subjects, write_tasks
from medtrain.contamination import TrainingIndex, check_questions
from medtrain.entrypoint import run_main
from medtrain.errors import ConfigError
from medtrain.generation import GenerationModelArguments, load_for_inference

logger = logging.getLogger("medtrain.eval")


@dataclass
class EvalArguments:
    """Flags of eval_benchmarks.py besides the model's (--model_name_or_path, --lora_model, --tokenizer_name_or_path,
    --template_name, --system_prompt, --torch_dtype, --trust_remote_code: :class:`GenerationModelArguments`, shared
    with inference and serving; the adapter is evaluated unmerged)."""

    benchmark_dir: str = field(metadata={"help": "Folder of benchmark files (CMMLU CSV, multiple-choice JSONL, PubMedQA json; dev/ = k-shot "
                                    "examples), or several folders separated by commas."})
    output_dir: str = field(metadata={"help": "Where the task configs and results go."})
    tasks: str | None = field(
        default=None, metadata={"help": "Comma-separated subjects (or medtrain_* task names, wildcards allowed); default all."}
    )
    num_fewshot: int = field(default=0, metadata={"help": "Worked examples (the first k of each subject's dev split) before each question."})
    limit: int | None = field(default=None, metadata={"help": "Score only the first N test questions of each subject."})
    batch_size: int = field(default=8, metadata={"help": "Log-likelihood requests per forward pass."})
    chat_template: bool = field(
        default=False,
        metadata={"help": "Render prompts with the chat format recorded at training time (or --template_name). "
                          "Default off: the plain prompt every model (base, SFT, DPO, PPO) sees identically, as in "
                          "published CMMLU/MMLU numbers and lm-eval's own default."},
    )
    log_samples: bool = field(default=False, metadata={"help": "Write OUT/samples.jsonl: every question with the model's choice and log-likelihoods."})
    train_file_dir: str | None = field(
        default=None,
        metadata={"help": "Contamination check: comma-separated training dirs/files (json, jsonl, txt) the model saw; "
                          "questions sharing a normalised 13-gram with them are reported per subject."},
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace the results in an existing output dir."})

    def __post_init__(self) -> None:
        problems = []
        if self.num_fewshot < 0:
            problems.append(f"--num_fewshot must be >= 0, got {self.num_fewshot}.")
        if self.limit is not None and self.limit <= 0:
            problems.append(f"--limit must be positive, got {self.limit}.")
        if self.batch_size <= 0:
            problems.append(f"--batch_size must be positive, got {self.batch_size}.")
        if problems:
            raise ConfigError(problems)


ARGUMENTS = [GenerationModelArguments, EvalArguments]


def check_arguments(model_args: GenerationModelArguments, args: EvalArguments) -> None:
    """Checks across the two dataclasses (each checks its own fields when parsed)."""
    if (model_args.template_name or model_args.system_prompt is not None) and not args.chat_template:
        raise ConfigError("--template_name/--system_prompt shape the chat prompt: add --chat_template True.")


OUTPUTS = ("tasks", "data", "logs", "results.json", "results.md", "lm_eval_results.json", "samples.jsonl",
           "reproduce.sh")


def check_output_dir(args: EvalArguments) -> None:
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite_output_dir:
        raise ConfigError(f"--output_dir {args.output_dir} is not empty: pick a new one or pass --overwrite_output_dir.")


def clear_previous_results(output_dir: str) -> None:
    """With --overwrite_output_dir: drop what an earlier run wrote, so no stale task, sample or log survives."""
    for name in OUTPUTS:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def main(argv: list[str] | None = None) -> dict:
    model_args, args = parse_args(ARGUMENTS, argv)
    check_arguments(model_args, args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, force=True)
    # Check everything (flags, output dir, benchmark files, training files, model) before writing anything
    check_output_dir(args)
    subjects = select_subjects(load_benchmarks(args.benchmark_dir), args.tasks)
    check_fewshot(subjects, args.num_fewshot)
    index = None
    if args.train_file_dir:
        index = TrainingIndex.from_paths([p.strip() for p in args.train_file_dir.split(",") if p.strip()])
    # The adapter stays unmerged (scored as trained); lm-eval's log-likelihood batches are right-padded; a chat
    # format only with --chat_template (the plain prompt needs none, so a bad recorded one cannot stop it)
    model, tokenizer, chat_format = load_for_inference(
        model_args, merge=False, padding_side="right", with_chat_format=args.chat_template,
        model_flag=flag_spelling(argv, GenerationModelArguments, "model_name_or_path"))
    n_questions = sum(len(s.test[: args.limit]) for s in subjects)
    logger.info("%d subjects, %d questions, %d-shot, chat template %s", len(subjects), n_questions,
                args.num_fewshot, "on" if chat_format else "off")

    # Task configs + normalised data, then lm-eval
    out = os.path.abspath(args.output_dir)
    task_dir = os.path.join(out, "tasks")
    clear_previous_results(out)
    write_tasks(subjects, out)
    lm = evaluation.build_lm(model, tokenizer, args.batch_size, chat_format)
    tasks = [s.task for s in subjects]
    start = time.perf_counter()
    # the system text (--system_prompt, else the one recorded at training time) goes before lm-eval's task description
    system = chat_format.system_prompt if chat_format is not None else None
    raw = evaluation.run_lm_eval(lm, task_dir, tasks, args.num_fewshot, args.limit, chat=chat_format is not None,
                                 system_instruction=system)
    wall = time.perf_counter() - start

    # Results
    contamination = None
    if index is not None:
        contamination = {s.task: check_questions(index, [q.to_json(False) for q in s.test[: args.limit]])
                         for s in subjects}
    summary = evaluation.summarize(raw, subjects, contamination)
    dtype = str(getattr(model, "dtype", "float32")).replace("torch.", "")
    command = evaluation.lm_eval_command(model_args.model_name_or_path, model_args.lora_model, task_dir, tasks,
                                         args.num_fewshot, args.limit, args.batch_size, dtype, chat_format is not None,
                                         system)
    summary = {
        "model_name_or_path": model_args.model_name_or_path, "lora_model": model_args.lora_model,
        "benchmark_dir": args.benchmark_dir, "num_fewshot": args.num_fewshot, "limit": args.limit,
        "batch_size": args.batch_size, "chat_format": chat_format.record() if chat_format else None,
        "train_file_dir": args.train_file_dir, "lm_eval_version": raw.get("lm_eval_version"), **summary,
        "timing": {"wall_s": round(wall, 2), "questions": summary["micro_average"]["n"],
                   "questions_per_s": round(summary["micro_average"]["n"] / wall, 3) if wall else None},
        # the plain CLI reproduces the numbers unless a medtrain template rendered the prompts
        "reproduce": command if chat_format is None or chat_format.name == "tokenizer" else None,
    }
    evaluation.json_dump({k: v for k, v in raw.items() if k != "samples"}, os.path.join(out, "lm_eval_results.json"))
    evaluation.json_dump(summary, os.path.join(out, "results.json"))
    table = evaluation.markdown_table(summary)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(table)
    if summary["reproduce"]:
        with open(os.path.join(out, "reproduce.sh"), "w", encoding="utf-8") as fh:
            fh.write("#!/usr/bin/env bash\n# The same questions through the plain lm-eval CLI: the same numbers.\n"
                     + summary["reproduce"] + "\n")
    if args.log_samples:
        evaluation.write_samples(evaluation.sample_rows(raw, subjects), os.path.join(out, "samples.jsonl"))
    evaluation.write_tensorboard(summary, os.path.join(out, "logs"))
    print(table, flush=True)
    print(f"{n_questions} questions in {wall:.1f} s ({n_questions / wall:.2f} questions/s); results in {out}",
          file=sys.stderr, flush=True)
    return summary


if __name__ == "__main__":
    run_main(main)
