"""Peak memory (RSS) of LoRA-DPO vs full-DPO on the same ~34M-parameter Llama built from a config.

    python bench/bench_dpo_memory.py                 # lora, full, full with precomputed reference; prints the ratios
    python bench/bench_dpo_memory.py --modes lora full --steps 8

Each run is a fresh subprocess that reports its own ``ru_maxrss`` (peak resident set) and its RSS after the imports,
so one run's peak cannot leak into another's. Full training holds the policy, its gradients, two AdamW moments and a
frozen reference copy (about 5x the weights); LoRA holds one copy of the weights (the reference is the same weights
with the adapter disabled) plus adapter-sized state. Activations are the same for both, so the ratio of the
model-dependent part (peak minus the import baseline) shows the difference more clearly than the raw peaks.
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
from machine import environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MODES = {
    "lora": [],
    "full": ["--use_peft", "False"],
    "full_precompute": ["--use_peft", "False", "--precompute_ref_log_probs", "True"],
}
WORDS = ("fever cough rest water doctor salt blood pressure sugar glucose medicine dose diet exercise sleep pain "
         "headache cold heart lung kidney liver skin eye ear child adult elderly daily weekly check follow avoid").split()


def build_model(directory: Path, hidden: int, layers: int, vocab: int) -> int:
    """A ChatML BPE tokenizer and a random Llama saved to ``directory``; returns the parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choices(WORDS, k=30)) for _ in range(500)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<pad>", "<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def write_pairs(path: Path, n: int) -> None:
    rng = random.Random(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            row = {"conversations": [{"from": "human", "value": " ".join(rng.choices(WORDS, k=40))}],
                   "chosen": " ".join(rng.choices(WORDS, k=60)), "rejected": " ".join(rng.choices(WORDS, k=60))}
            fh.write(json.dumps(row) + "\n")


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return kb / 1024


def child(args: list[str]) -> None:
    """Run one DPO job in this process and print its memory as JSON on the last line."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    import dpo_training

    after_import = rss_mb()
    trainer = dpo_training.main(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    runtime = next(h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h)
    print(json.dumps({"import_rss_mb": after_import, "peak_rss_mb": peak, "train_runtime_s": runtime}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child is not None:
        child(options.child)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = build_model(work / "model", options.hidden, options.layers, options.vocab)
        write_pairs(work / "data" / "pairs.jsonl", 32)
        print(f"model: Llama {options.layers} layers x {options.hidden} hidden, vocab {options.vocab}: "
              f"{params / 1e6:.1f}M parameters ({params * 4 / 2**20:.0f} MiB in fp32); "
              f"{options.steps} steps of {options.batch} pairs")
        print(f"environment: {json.dumps(environment())}")
        results = {}
        for mode in options.modes:
            job = ["--model_name_or_path", str(work / "model"), "--train_file_dir", str(work / "data"),
                   "--output_dir", str(work / f"out-{mode}"), "--model_max_length", "256",
                   "--per_device_train_batch_size", str(options.batch), "--max_steps", str(options.steps),
                   "--learning_rate", "1e-4", "--save_strategy", "no", "--report_to", "none", "--do_eval", "False",
                   "--disable_tqdm", "True", *MODES[mode]]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run([sys.executable, __file__, "--child", *job], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(f"{mode:16s} peak RSS {r['peak_rss_mb']:7.0f} MiB   after imports {r['import_rss_mb']:6.0f} MiB   "
                  f"training part {r['peak_rss_mb'] - r['import_rss_mb']:6.0f} MiB   train {r['train_runtime_s']:.1f} s")
        if "lora" in results:
            base = results["lora"]
            for mode, r in results.items():
                if mode != "lora":
                    raw = r["peak_rss_mb"] / base["peak_rss_mb"]
                    part = (r["peak_rss_mb"] - r["import_rss_mb"]) / (base["peak_rss_mb"] - base["import_rss_mb"])
                    print(f"{mode} / lora: peak RSS x{raw:.2f}, training part x{part:.2f}")


if __name__ == "__main__":
    main()
