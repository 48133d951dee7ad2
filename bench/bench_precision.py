"""fp32 vs bf16 on this CPU: a matmul probe and one SFT training step per precision mode, alternating in one process.

    python bench/bench_precision.py                          # matmul probe + step modes, 3 rounds
    python bench/bench_precision.py --what matmul            # the 2048^2 matmul probe only (seconds)
    python bench/bench_precision.py --modes fp32,bf16_autocast --rounds 2
    python bench/bench_precision.py --what step --modes fp32,bf16_autocast --rounds 1 --profile   # + op table per mode

The step is what ``supervised_finetuning.py`` runs per batch (SmolLM2-135M-Instruct, LoRA r8/alpha16/dropout 0.05 on
all linear layers through the fused branch, 4 packed rows of 512 tokens from medical_sft_1K_format.jsonl, attention per
packed sequence, the fused supervised-token loss, AdamW on the adapter): forward + loss + backward + optimizer step.
Modes:

- ``fp32``: fp32 weights, no autocast (``--torch_dtype float32 --bf16 False``);
- ``autocast``: fp32 weights under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (``--bf16 True``);
- ``bf16_weights``: bf16 frozen base, fp32 adapter, no autocast (``--torch_dtype bfloat16``);
- ``bf16_autocast``: bf16 frozen base + autocast (``--torch_dtype bfloat16 --bf16 True``);
- ``peft_fp32`` / ``peft_autocast``: the stock path for reference (PEFT's LoRA forward, full logits + transformers'
  loss, the same packed rows), fp32 and under autocast.

The rounds alternate the modes (A, B, C, A, B, C, ...) after one warm-up step each, so load changes hit every mode.
The first step's loss of each mode (the same batch and adapter) is reported against fp32's. Writes
bench/results/precision-<time>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "medical-zh" / "sft" / "medical_sft_1K_format.jsonl"
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
MODES = ("fp32", "autocast", "bf16_weights", "bf16_autocast", "peft_fp32", "peft_autocast")


def matmul_probe(size: int = 2048, reps: int = 5, rounds: int = 3) -> dict:
    """GFLOPS of a size^2 matmul in fp32 and bf16, alternating; plus a SmolLM2-shaped linear forward+input grad."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    operands = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    x, w = torch.randn(2048, 576), torch.randn(1536, 576)
    linear = {"fp32": (x, w), "bf16": (x.bfloat16(), w.bfloat16())}
    times: dict[str, list[float]] = {f"matmul_{k}": [] for k in operands} | {f"linear_{k}": [] for k in linear}
    for dtype in operands:  # warm-up
        operands[dtype][0] @ operands[dtype][1]
    for _ in range(rounds):
        for dtype, (p, q) in operands.items():
            start = time.perf_counter()
            for _ in range(reps):
                p @ q
            times[f"matmul_{dtype}"].append((time.perf_counter() - start) / reps)
        for dtype, (p, q) in linear.items():
            start = time.perf_counter()
            for _ in range(reps):
                out = p @ q.t()  # forward
                out @ q  # input gradient (the frozen weight needs none)
            times[f"linear_{dtype}"].append((time.perf_counter() - start) / reps)
    result = {name: round(min(values) * 1e3, 2) for name, values in times.items()}
    flops = 2 * size**3
    result["matmul_fp32_gflops"] = round(flops / min(times["matmul_fp32"]) / 1e9, 1)
    result["matmul_bf16_gflops"] = round(flops / min(times["matmul_bf16"]) / 1e9, 1)
    result["matmul_bf16_speedup"] = round(min(times["matmul_fp32"]) / min(times["matmul_bf16"]), 2)
    result["linear_bf16_speedup"] = round(min(times["linear_fp32"]) / min(times["linear_bf16"]), 2)
    return result


def packed_batch(model_dir: Path, data: Path, rows: int, length: int) -> dict:
    from transformers import AutoTokenizer

    from medtrain.chat_format import get_chat_format
    from medtrain.data import tokenize_conversations
    from medtrain.efficiency import PackedRowsCollator, pack_sequences
    from medtrain.formats import load_conversations

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = load_conversations([str(data)])[: rows * 12]
    dataset = tokenize_conversations(records, tokenizer, get_chat_format(tokenizer, None), length, False)
    packed = pack_sequences(dataset, length)
    batch = PackedRowsCollator(tokenizer.pad_token_id)([packed[i] for i in range(rows)])
    batch.pop("num_real_tokens")
    return batch


def build(model_dir: Path, mode: str):
    from transformers import AutoModelForCausalLM

    from medtrain.arguments import LoraArguments
    from medtrain.attention import register_varlen_attention
    from medtrain.modeling import apply_lora

    torch.manual_seed(42)
    dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.set_attn_implementation(register_varlen_attention())
    lora = LoraArguments(lora_rank=8, lora_alpha=16, lora_dropout=0.05, fused_lora=not mode.startswith("peft"))
    model = apply_lora(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    return model, optimizer


def step(model, optimizer, batch: dict, mode: str) -> float:
    """forward + loss + backward + AdamW step, as EfficientSFTTrainer (or, for peft_*, stock transformers) runs it."""
    from medtrain.fused_loss import linear_cross_entropy
    from medtrain.tokenization import IGNORE_INDEX

    autocast = mode.endswith("autocast")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if mode.startswith("peft"):
            loss = model(**batch, use_cache=False).loss
        else:
            captured = {}
            base = model.get_base_model()
            handle = base.model.register_forward_hook(lambda m, i, o: captured.update(h=o.last_hidden_state))
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1)
            handle.remove()
            targets = batch["labels"][:, 1:]
            mask = targets != IGNORE_INDEX
            head = base.get_output_embeddings()
            loss_sum, _, _ = linear_cross_entropy(captured["h"][:, :-1][mask], head.weight, head.bias, targets[mask])
            loss = loss_sum / mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def profile_step(model, optimizer, batch: dict, mode: str, top: int = 18) -> list[dict]:
    """One step under torch.profiler: the ``top`` ops by self CPU time (name, input dtypes seen, ms, share)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        step(model, optimizer, batch, mode)
    return top_ops(prof.key_averages(), f"profile {mode}", top)


def top_ops(averages, title: str, top: int = 18) -> list[dict]:
    """Print and return the ``top`` ops of a profiler's ``key_averages()`` by self CPU time, with their share."""
    events = [e for e in averages if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    rows = [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1000, 1),
             "share": round(e.self_cpu_time_total / total, 3)}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]
    print(f"{title}: {total / 1e6:.2f} s self CPU in all ops")
    for row in rows:
        print(f"  {row['op'][:60]:60} {row['calls']:6d} calls {row['self_ms']:9.1f} ms {100 * row['share']:5.1f}%")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["all", "matmul", "step"], default="all")
    parser.add_argument("--modes", default="fp32,autocast,bf16_weights,bf16_autocast")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--profile", action="store_true",
                        help="after the timed rounds, profile one more step per mode (torch.profiler, top ops by self CPU)")
    args = parser.parse_args()
    record: dict = {"environment": environment(), "job": vars(args) | {"model": str(args.model), "data": str(args.data)}}
    if args.what in ("all", "matmul"):
        record["matmul"] = matmul_probe()
        print(json.dumps(record["matmul"]))
    if args.what in ("all", "step"):
        modes = args.modes.split(",")
        unknown = set(modes) - set(MODES)
        if unknown:
            parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
        batch = packed_batch(args.model, args.data, args.rows, args.length)
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        built = {mode: build(args.model, mode) for mode in modes}
        first_loss = {}
        for mode in modes:  # warm-up, same adapter state
            first_loss[mode] = step(*built[mode], batch, mode)
            print(f"warm-up {mode}: loss {first_loss[mode]:.5f}", flush=True)
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode in modes:
                start = time.perf_counter()
                step(*built[mode], batch, mode)
                times[mode].append(time.perf_counter() - start)
                print(f"{mode}: {times[mode][-1]:.2f} s", flush=True)
        if args.profile:
            record["profile"] = {mode: profile_step(*built[mode], batch, mode) for mode in modes}
        reference = first_loss.get("fp32")
        record["step"] = {
            "tokens": int(batch["input_ids"].numel()), "supervised_tokens": supervised,
            "modes": {mode: {"seconds": [round(t, 3) for t in times[mode]],
                             "median_s": round(statistics.median(times[mode]), 3),
                             "first_loss": round(first_loss[mode], 5),
                             "loss_vs_fp32": (round(first_loss[mode] / reference - 1, 5) if reference else None)}
                      for mode in modes},
        }
        base = record["step"]["modes"].get("fp32", {}).get("median_s")
        print(f"{'mode':16} {'median s':>9} {'x fp32':>7} {'first loss':>11} {'vs fp32':>8}")
        for mode, row in record["step"]["modes"].items():
            speed = f"{base / row['median_s']:.2f}" if base else "-"
            rel = f"{100 * row['loss_vs_fp32']:+.2f}%" if row["loss_vs_fp32"] is not None else "-"
            print(f"{mode:16} {row['median_s']:9.2f} {speed:>7} {row['first_loss']:11.4f} {rel:>8}")
    record["environment"]["uptime_end"] = environment()["uptime"]
    out = ROOT / "bench" / "results" / f"precision-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"environment: {json.dumps(record['environment'])}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
