"""Preprocessing speed: load + tokenise + mask N multi-turn SFT conversations, as supervised_finetuning.py does.

    python bench/bench_preprocess.py                      # 10,000 conversations, 1 and 2 worker processes
    python bench/bench_preprocess.py --profile            # + the top functions of a cProfile of the 1-process run
    python bench/bench_preprocess.py --baseline 77a0f53    # + the same runs with medtrain from a git commit, alternating
    python bench/bench_preprocess.py --llamafactory        # + LLaMA-Factory's preprocessing of the same file, alternating

The conversations are synthesised (deterministically, seed 0) from medical_sft_1K_format.jsonl of ../shared: each
has 1-4 turns, every turn a (question, answer) pair drawn from the file, so the text and its token lengths are the real
ones. Timed: ``load_conversations`` (parse + validate the JSON Lines file) and ``tokenize_conversations`` (render the
chat format per turn, tokenise, assistant-only labels, truncation at 512) with the SmolLM2 tokenizer's chat template
(the SFT default) and ``--template_name chatml``. ``--llamafactory`` times LLaMA-Factory 0.9.5's ``get_dataset`` (its
JSON load into a fresh datasets cache, ShareGPT conversion, its ``smollm2`` template, supervised masking, cutoff 512)
on the same file with the same worker counts, in its own venv (bench/.venv-llamafactory, installed by
bench/bench_sft.py). CPU seconds include worker processes. Writes bench/results/preprocess-<time>.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and "--code" in sys.argv:  # a child run: medtrain from an exported commit
    sys.path.insert(0, sys.argv[sys.argv.index("--code") + 1])
sys.path.insert(1 if "--code" in sys.argv else 0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "medical-zh" / "sft" / "medical_sft_1K_format.jsonl"
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


def synthesise(source: Path, count: int, out: Path, seed: int = 0) -> dict:
    """Write ``count`` conversations of 1-4 turns built from the (question, answer) pairs of ``source``."""
    pairs = []
    with open(source, encoding="utf-8") as fh:
        for line in fh:
            turns = json.loads(line)["conversations"]
            pairs += [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns) - 1, 2)]
    rng = random.Random(seed)
    turns_total = 0
    with open(out, "w", encoding="utf-8") as fh:
        for _ in range(count):
            n = rng.randint(1, 4)
            turns_total += n
            conversation = []
            for question, answer in rng.sample(pairs, n):
                conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            fh.write(json.dumps({"conversations": conversation}, ensure_ascii=False) + "\n")
    return {"conversations": count, "turns": turns_total, "bytes": out.stat().st_size}


def run(data: Path, model: Path, template: str | None, workers: int | None, max_length: int) -> dict:
    from transformers import AutoTokenizer

    from medtrain.chat_format import get_chat_format
    from medtrain.data import tokenize_conversations
    from medtrain.formats import load_conversations

    import medtrain

    tokenizer = AutoTokenizer.from_pretrained(model)
    chat_format = get_chat_format(tokenizer, template)
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    records = load_conversations([str(data)])
    loaded = time.perf_counter()
    dataset = tokenize_conversations(records, tokenizer, chat_format, max_length, False, num_proc=workers)
    done = time.perf_counter()
    tokens = sum(map(len, dataset["input_ids"]))
    return {"code": str(Path(medtrain.__file__).parents[1]), "template": template or "tokenizer chat template",
            "workers": workers or 1, "load_s": round(loaded - start, 2), "tokenize_s": round(done - loaded, 2),
            "total_s": round(done - start, 2), "cpu_s": round(cpu_seconds() - cpu_start, 2), "samples": len(dataset),
            "tokens": tokens, "supervised_tokens": sum(sum(1 for x in l if x != -100) for l in dataset["labels"]),
            "tokens_per_s": round(tokens / (done - start))}


LF_DRIVER = r"""
import json, resource, sys, time

def cpu():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer

model_args, data_args, training_args, _, _ = get_train_args(json.loads(sys.argv[1]))
module = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
cpu_start, start = cpu(), time.perf_counter()
dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **module)["train_dataset"]
done = time.perf_counter()
tokens = sum(map(len, dataset["input_ids"]))
print(json.dumps({"code": "LLaMA-Factory", "template": "smollm2 (LLaMA-Factory)",
                  "workers": data_args.preprocessing_num_workers or 1, "total_s": round(done - start, 2),
                  "cpu_s": round(cpu() - cpu_start, 2), "samples": len(dataset), "tokens": tokens,
                  "supervised_tokens": sum(sum(1 for x in l if x != -100) for l in dataset["labels"]),
                  "tokens_per_s": round(tokens / (done - start))}))
"""


def run_llamafactory(data: Path, model: Path, workers: int, max_length: int, work: Path) -> dict:
    """LLaMA-Factory's load + preprocessing of ``data`` (its get_dataset), in its venv, with a fresh datasets cache."""
    from bench_sft import ENV, LF_VENV, ensure_llamafactory

    ensure_llamafactory()
    run_dir = Path(tempfile.mkdtemp(dir=work))
    (run_dir / "dataset_info.json").write_text(json.dumps(
        {"bench": {"file_name": str(data), "formatting": "sharegpt", "columns": {"messages": "conversations"}}}))
    config = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
              "dataset": "bench", "dataset_dir": str(run_dir), "template": "smollm2", "cutoff_len": max_length,
              "overwrite_cache": True, "output_dir": str(run_dir / "out"), "report_to": "none",
              "preprocessing_num_workers": workers if workers > 1 else None}
    env = dict(os.environ, **ENV, HF_DATASETS_CACHE=str(run_dir / "cache"), HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    env.pop("PYTHONPATH", None)
    out = subprocess.run([str(LF_VENV / "bin" / "python"), "-c", LF_DRIVER, json.dumps(config)], capture_output=True,
                         text=True, env=env, cwd=run_dir)
    if out.returncode != 0:
        raise SystemExit(f"error: LLaMA-Factory preprocessing failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_seconds() -> float:
    """User + system CPU time of this process, its threads and its finished children (worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker process counts")
    parser.add_argument("--templates", default="tokenizer,chatml")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--baseline", help="a git commit whose medtrain is timed too, alternating with this one")
    parser.add_argument("--llamafactory", action="store_true",
                        help="also time LLaMA-Factory's preprocessing of the same file (per worker count, alternating)")
    parser.add_argument("--code", help=argparse.SUPPRESS)  # internal: medtrain directory of a child run
    parser.add_argument("--conversations", type=Path, help=argparse.SUPPRESS)  # internal: a child's input file
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import datasets

    datasets.disable_progress_bars()
    if args.code:  # child: one measurement, printed as the last line
        template, workers = args.templates, int(args.workers)
        print(json.dumps(run(args.conversations, args.model, None if template == "tokenizer" else template,
                             workers if workers > 1 else None, args.max_length)))
        return
    record: dict = {"environment": environment(), "baseline": args.baseline, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "conversations.jsonl"
        record["data"] = synthesise(args.data, args.count, data)
        print(json.dumps(record["data"]))
        codes = [str(ROOT)]
        if args.baseline:
            export = Path(tmp) / "baseline"
            export.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline, "medtrain"], cwd=ROOT, capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True)
            codes.append(str(export))
        for template in args.templates.split(","):
            for workers in args.workers.split(","):
                for code in codes:  # alternating: this commit, the baseline, in separate processes
                    out = subprocess.run([sys.executable, __file__, "--code", code, "--conversations", str(data),
                                          "--templates", template, "--workers", workers, "--model", str(args.model),
                                          "--max_length", str(args.max_length)],
                                         capture_output=True, text=True, check=True)
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    result["code"] = "baseline " + args.baseline if code != str(ROOT) else "this commit"
                    record["runs"].append(result)
                    print(json.dumps(result), flush=True)
                if args.llamafactory and template == args.templates.split(",")[0]:
                    result = run_llamafactory(data, args.model.resolve(), int(workers), args.max_length, Path(tmp))
                    record["runs"].append(result)
                    print(json.dumps(result), flush=True)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run(data, args.model, None, None, args.max_length)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
            record["profile"] = text.getvalue()
            print(record["profile"])
    record["environment"]["uptime_end"] = environment()["uptime"]
    out = ROOT / "bench" / "results" / f"preprocess-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, ensure_ascii=False))
    print(f"environment: {json.dumps(record['environment'])}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
