"""Running lm-eval on a loaded model and turning its output into our results files.

The engine is lm-evaluation-harness (``lm_eval.simple_evaluate``) on an ``HFLM`` built around a model instance, so
a base + LoRA adapter is scored as the unmerged ``PeftModel``. With the chat template on, prompts are rendered by
the chat format recorded at training time (:class:`ChatFormatLM`); everything else is lm-eval's own code path, so
``lm_eval --include_path OUT/tasks ...`` on the same model reproduces the numbers.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from lm_eval.models.huggingface import HFLM


class ChatFormatLM(HFLM):
    """HFLM whose chat rendering is our chat format (a template.py template or the tokenizer's own template).

    lm-eval builds the conversation (task description as the system message, k-shot examples as earlier turns when
    ``fewshot_as_multiturn``) and asks the model to render it; the rendered prompt is then tokenised as a whole and
    scored against each choice, as for any HFLM.
    """

    def __init__(self, *args: Any, chat_format: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.chat_format = chat_format

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not add_generation_prompt:  # only generation tasks with a gen_prefix ask for this; ours are loglikelihood
            raise NotImplementedError("continuing a final assistant message is not supported by medtrain formats")
        return self.chat_format.generation_prompt(chat_history)

    def chat_template(self, chat_template: bool | str = False) -> str:
        return json.dumps(self.chat_format.record(), ensure_ascii=False) if chat_template else ""


def build_lm(model: Any, tokenizer: Any, batch_size: int, chat_format: Any | None = None) -> HFLM:
    """An lm-eval model around a loaded model instance (base, merged, or PeftModel)."""
    kwargs = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    if chat_format is not None:
        return ChatFormatLM(chat_format=chat_format, **kwargs)
    return HFLM(**kwargs)


def run_lm_eval(lm: HFLM, task_dir: str, tasks: list[str], num_fewshot: int, limit: int | None,
                chat: bool, system_instruction: str | None = None) -> dict:
    """lm-eval's results dict (with per-question samples) for ``tasks`` read from the YAMLs in ``task_dir``.

    ``system_instruction`` (chat only) goes before the task description in the system message, lm-eval's own rule.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=task_dir, include_defaults=False)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=True,
        apply_chat_template=chat, fewshot_as_multiturn=chat and num_fewshot > 0,
        system_instruction=system_instruction if chat else None,
    )


# --------------------------------------------------------------------------------------------------------------
# Results


def _stderr(values: list[float]) -> float | None:
    """Standard error of the mean with the sample variance (lm-eval's ``mean_stderr``)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def summarize(raw: dict, subjects: list[Any], contamination: dict[str, list[str]] | None) -> dict:
    """results.json: per subject n/acc/acc_norm/stderr (+ contamination), and macro and micro averages.

    Macro = the mean of the subject accuracies (stderr combined as sqrt(sum se^2) / k); micro = every question
    counted once (its stderr from the per-question correctness, as lm-eval computes a subject's).
    """
    rows: dict[str, dict] = {}
    all_acc: list[float] = []
    all_norm: list[float] = []
    for subject in subjects:
        result = raw["results"][subject.task]
        samples = raw["samples"][subject.task]
        row = {
            "task": subject.task,
            "n": len(samples),
            "acc": result["acc,none"],
            "acc_stderr": _number(result["acc_stderr,none"]),  # lm-eval: "N/A" for a single question
            "acc_norm": result["acc_norm,none"],
            "acc_norm_stderr": _number(result["acc_norm_stderr,none"]),
        }
        if contamination is not None:
            ids = contamination.get(subject.task, [])
            row.update(contaminated=len(ids), contaminated_ids=ids)
        rows[subject.name] = row
        all_acc += [float(s["acc"]) for s in samples]
        all_norm += [float(s["acc_norm"]) for s in samples]
    k = len(rows)
    macro = {
        "n": sum(r["n"] for r in rows.values()),
        "acc": sum(r["acc"] for r in rows.values()) / k,
        "acc_stderr": _combined([r["acc_stderr"] for r in rows.values()]),
        "acc_norm": sum(r["acc_norm"] for r in rows.values()) / k,
        "acc_norm_stderr": _combined([r["acc_norm_stderr"] for r in rows.values()]),
    }
    micro = {
        "n": len(all_acc),
        "acc": sum(all_acc) / len(all_acc),
        "acc_stderr": _stderr(all_acc),
        "acc_norm": sum(all_norm) / len(all_norm),
        "acc_norm_stderr": _stderr(all_norm),
    }
    if contamination is not None:
        total = sum(r["contaminated"] for r in rows.values())
        macro["contaminated"] = micro["contaminated"] = total
    return {"subjects": rows, "macro_average": macro, "micro_average": micro}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def _combined(stderrs: list[float | None]) -> float | None:
    """Stderr of the mean of k independent subject accuracies: sqrt(sum se^2) / k (None if one is unknown)."""
    if any(se is None for se in stderrs):
        return None
    return math.sqrt(sum(se ** 2 for se in stderrs)) / len(stderrs)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(summary: dict) -> str:
    """subject | n | acc | ± | acc_norm | ± [| contaminated] rows, then the macro and micro averages."""
    contamination = "contaminated" in summary["micro_average"]
    header = ["subject", "n", "acc", "acc stderr", "acc_norm", "acc_norm stderr"]
    header += ["contaminated"] if contamination else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]

    def line(name: str, row: dict) -> str:
        cells = [name, str(row["n"]), _fmt(row["acc"]), _fmt(row["acc_stderr"]), _fmt(row["acc_norm"]),
                 _fmt(row["acc_norm_stderr"])]
        if contamination:
            cells.append(str(row.get("contaminated", 0)))
        return "| " + " | ".join(cells) + " |"

    for name, row in summary["subjects"].items():
        lines.append(line(name, row))
    lines.append(line("**macro average**", summary["macro_average"]))
    lines.append(line("**micro average**", summary["micro_average"]))
    return "\n".join(lines) + "\n"


def sample_rows(raw: dict, subjects: list[Any]) -> dict[str, list[dict]]:
    """Per question: id, the model's choice, the answer, correct, and the log-likelihood of every choice."""
    out = {}
    for subject in subjects:
        rows = []
        for sample in raw["samples"][subject.task]:
            loglik = [float(resp[0]) for resp in sample["filtered_resps"]]
            doc = sample["doc"]
            labels = doc.get("letters") or doc["choices"]
            choice = max(range(len(loglik)), key=loglik.__getitem__)
            rows.append({
                "id": doc["id"], "question": doc["question"], "choices": doc["choices"],
                "answer": labels[doc["answer"]], "model_choice": labels[choice], "correct": bool(sample["acc"]),
                "loglikelihoods": loglik, "prompt": sample["arguments"][0][0],
            })
        out[subject.name] = rows
    return out


def write_tensorboard(summary: dict, log_dir: str) -> None:
    """eval/<subject>/acc (and acc_norm) scalars, plus eval/macro_average and eval/micro_average."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=log_dir)
    try:
        rows = dict(summary["subjects"], macro_average=summary["macro_average"], micro_average=summary["micro_average"])
        for name, row in rows.items():
            for metric in ("acc", "acc_norm"):
                writer.add_scalar(f"eval/{name}/{metric}", row[metric], 0)
    finally:
        writer.close()


def json_dump(obj: Any, path: str) -> None:
    from lm_eval.utils import handle_non_serializable

    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=2, default=handle_non_serializable)
        fh.write("\n")


def write_samples(rows: dict[str, list[dict]], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for subject, questions in rows.items():
            for row in questions:
                fh.write(json.dumps(dict(subject=subject, **row), ensure_ascii=False) + "\n")


def lm_eval_command(model: str, lora_model: str | None, task_dir: str, tasks: list[str], num_fewshot: int,
                    limit: int | None, batch_size: int, dtype: str, chat: bool,
                    system_instruction: str | None = None) -> str:
    """The plain lm_eval CLI call that reproduces these numbers (chat: only with the tokenizer's own template)."""
    import shlex

    model_args = f"pretrained={model},dtype={dtype}" + (f",peft={lora_model}" if lora_model else "")
    parts = ["lm_eval", "--model", "hf", "--model_args", model_args, "--include_path", task_dir,
             "--tasks", ",".join(tasks), "--num_fewshot", str(num_fewshot), "--batch_size", str(batch_size)]
    if limit is not None:
        parts += ["--limit", str(limit)]
    if chat:
        parts += ["--apply_chat_template"] + (["--fewshot_as_multiturn"] if num_fewshot > 0 else [])
        parts += ["--system_instruction", system_instruction] if system_instruction else []
    return " ".join(shlex.quote(p) for p in parts)
