"""Print the key metric of every pipeline stage and the models' answers to held-out questions, side by side.

Also draws every stage's training curves in one picture, pipeline_dir/pipeline_curves.png (path printed).

    python pipeline_summary.py --pipeline_dir outputs-pipeline --base_model models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import math
import os

from medtrain.entrypoint import run_main
from medtrain.errors import UserError
from medtrain.plotting import PIPELINE_FILE, plot_pipeline, read_log_history

STAGES = ("pt", "sft", "rm", "ppo", "dpo")  # pipeline order; a stage directory that is absent is left out


def _json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _find(metrics: dict, *needles: str) -> float | None:
    """The first metric whose name contains every needle (metric names differ slightly between trainers)."""
    for key, value in metrics.items():
        if all(n in key for n in needles) and isinstance(value, (int, float)):
            return float(value)
    return None


def _log(pipeline_dir: str, stage: str) -> list[dict]:
    return _json(os.path.join(pipeline_dir, stage, "trainer_state.json")).get("log_history", [])


def stage_metrics(pipeline_dir: str) -> list[tuple[str, str]]:
    """(stage, human-readable key metric) rows."""
    rows = []
    pt_evals = [e for e in _log(pipeline_dir, "pt") if "eval_loss" in e]
    pt = _json(os.path.join(pipeline_dir, "pt", "eval_results.json"))
    if pt:
        before = f"{math.exp(pt_evals[0]['eval_loss']):.2f} -> " if pt_evals else ""
        rows.append(("PT", f"held-out perplexity {before}{pt.get('perplexity', float('nan')):.2f}"))
    sft = _json(os.path.join(pipeline_dir, "sft", "eval_results.json"))
    if sft:
        rows.append(("SFT", f"eval loss {sft['eval_loss']:.4f} (perplexity {math.exp(sft['eval_loss']):.2f})"))
    rm = _json(os.path.join(pipeline_dir, "rm", "eval_results.json"))
    if rm:
        rows.append(("RM", f"held-out pairwise accuracy {_find(rm, 'accuracy'):.3f}, mean margin "
                           f"{_find(rm, 'margin') or float('nan'):.3f}"))
    dpo = _json(os.path.join(pipeline_dir, "dpo", "eval_results.json"))
    if dpo:
        rows.append(("DPO", f"held-out reward margin {_find(dpo, 'rewards/margins'):.4f}, preference accuracy "
                            f"{_find(dpo, 'rewards/accuracies'):.3f}"))
    ppo = [e for e in _log(pipeline_dir, "ppo") if "objective/score_mean" in e]
    if ppo:
        scores = [e["objective/score_mean"] for e in ppo]
        # each update samples other prompts, so single updates are noisy: show first, last and mean
        rows.append(("PPO", f"reward-model score per update: first {scores[0]:.3f}, last {scores[-1]:.3f}, mean "
                            f"{sum(scores) / len(scores):.3f}; KL last {ppo[-1]['objective/kl']:.4f}, max "
                            f"{max(e['objective/kl'] for e in ppo):.4f} ({len(ppo)} updates)"))
    return rows


EVAL_RUNS = (("base", "base"), ("SFT", "sft"), ("DPO", "dpo"), ("PPO", "ppo"))


def eval_table(pipeline_dir: str) -> str | None:
    """Benchmark accuracy of every evaluated model side by side (acc ± stderr per subject, macro and micro average),
    and how many questions overlap each model's training data (13-gram contamination check)."""
    runs = [(name, _json(os.path.join(pipeline_dir, "eval", key, "results.json"))) for name, key in EVAL_RUNS]
    runs = [(name, results) for name, results in runs if results]
    if not runs:
        return None
    subjects: list[str] = []
    for _, results in runs:
        subjects += [s for s in results["subjects"] if s not in subjects]
    checked = [(name, results) for name, results in runs if results.get("train_file_dir")]
    header = ["subject", "n"] + [name for name, _ in runs]
    if checked:
        header.append("contaminated (" + "/".join(name for name, _ in checked) + ")")

    def cells(label: str, pick) -> list[str]:
        rows = [pick(results) for _, results in runs]
        ns = {str(row["n"]) for row in rows if row}
        line = [label, "/".join(sorted(ns))]
        line += [f"{row['acc']:.3f} ± " + (f"{row['acc_stderr']:.3f}" if row["acc_stderr"] is not None else "?")
                 if row else "-" for row in rows]
        if checked:
            line.append("/".join(str((pick(results) or {}).get("contaminated", "-")) for _, results in checked))
        return line

    table = [cells(subject, lambda r, s=subject: r["subjects"].get(s)) for subject in subjects]
    table.append(cells("macro average", lambda r: r["macro_average"]))
    table.append(cells("micro average", lambda r: r["micro_average"]))
    widths = [max(len(row[i]) for row in [header] + table) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    first = runs[0][1]
    limit = "all" if first["limit"] is None else f"the first {first['limit']}"
    lines.append(f"acc ± stderr, {first['num_fewshot']}-shot, {limit} questions per subject; a difference under "
                 "~2 stderr is noise.")
    return "\n".join(lines)


def eval_rows(pipeline_dir: str) -> list[tuple[str, str]]:
    """One ``(model, text)`` row per evaluated model for the figure's table: micro-averaged accuracy ± stderr."""
    rows = []
    for name, key in EVAL_RUNS:
        results = _json(os.path.join(pipeline_dir, "eval", key, "results.json"))
        if results:
            micro = results["micro_average"]
            stderr = "?" if micro.get("acc_stderr") is None else f"{micro['acc_stderr']:.3f}"
            rows.append((f"eval {name}", f"benchmark acc {micro['acc']:.3f} ± {stderr} over {micro['n']} questions"))
    return rows


def write_figure(pipeline_dir: str, table_rows: list[tuple[str, str]]) -> str | None:
    """``pipeline_dir/pipeline_curves.png``: every stage's training curves (a row per stage) above a table.

    ``table_rows`` are ``(stage, text)`` rows: the key metric per stage; an evaluation table's rows (one per model
    and benchmark) are appended to the same list by the caller, so the picture holds whatever the summary prints.
    """
    stages = {name.upper(): read_log_history(os.path.join(pipeline_dir, name)) for name in STAGES}
    path = plot_pipeline(stages, os.path.join(pipeline_dir, PIPELINE_FILE),
                         table=(("stage", "key metric"), table_rows) if table_rows else None)
    return None if path is None else str(path)


def answers(model_dir: str, questions: list[list[dict]], max_new_tokens: int) -> list[str]:
    # local: torch/transformers load only when answers are asked for; the summary tables need none of them
    from inference import generate_responses
    from medtrain.arguments import ModelArguments
    from medtrain.chat_format import resolve_chat_format
    from medtrain.modeling import load_model, load_tokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars inside the summary
    args = ModelArguments(model_name_or_path=model_dir)
    tokenizer = load_tokenizer(args, padding_side="left")
    model = load_model(args).eval()
    chat_format = resolve_chat_format(tokenizer, [model_dir], None, None)
    return generate_responses(model, tokenizer, chat_format, questions, max_new_tokens=max_new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline_dir", required=True)
    parser.add_argument("--base_model", required=True)
    parser.add_argument("--questions", default="data/prompts/heldout_questions.jsonl")
    parser.add_argument("--num_questions", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args()
    if not os.path.isdir(args.pipeline_dir):
        raise UserError(f"--pipeline_dir {args.pipeline_dir}: no such directory")

    print("\n" + "=" * 100 + "\nPIPELINE SUMMARY: key metric per stage\n" + "=" * 100)
    rows = stage_metrics(args.pipeline_dir)
    for stage, text in rows:
        print(f"{stage:>4}  {text}")

    table = eval_table(args.pipeline_dir)
    if table:
        print("\n" + "=" * 100 + "\nBENCHMARK ACCURACY (eval_benchmarks.py, lm-eval)\n" + "=" * 100)
        print(table)
    # the figure holds what the summary prints: every stage's curves, the key metrics and the benchmark averages
    figure = write_figure(args.pipeline_dir, rows + eval_rows(args.pipeline_dir))
    if figure:
        print(f"\ntraining curves of every stage: {figure}")

    from medtrain.formats import load_prompts

    prompts = load_prompts([args.questions])
    # Alternate languages so a short summary shows both Chinese and English questions.
    order = sorted(range(len(prompts)), key=lambda i: (i % (len(prompts) // 2 or 1), i))
    prompts = [prompts[i] for i in order][: args.num_questions]
    models = [("base", args.base_model)] + [
        (name.upper(), os.path.join(args.pipeline_dir, f"{name}-merged")) for name in ("sft", "dpo", "ppo")
    ]
    outputs = {name: answers(path, [p["messages"] for p in prompts], args.max_new_tokens)
               for name, path in models if os.path.isdir(path)}
    print("\n" + "=" * 100 + "\nANSWERS TO HELD-OUT QUESTIONS (greedy, first "
          f"{args.max_new_tokens} tokens)\n" + "=" * 100)
    for i, prompt in enumerate(prompts):
        print(f"\nQ{i + 1}: {prompt['messages'][-1]['content']}")
        for name, replies in outputs.items():
            # an answer cut at max_new_tokens can end inside a multi-byte character: drop the partial bytes
            print(f"  [{name:>4}] {' '.join(replies[i].rstrip(chr(0xFFFD)).split())}")


if __name__ == "__main__":
    run_main(main)
