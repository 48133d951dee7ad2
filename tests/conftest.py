"""Shared fixtures: a tiny tokenizer trained in the test and tiny random Llama models built from a config.

Nothing here needs the Hub or ../shared; tests that use ../shared skip with a reason when it is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
# The suite's tiny-model numerics are fp32: stage scripts (subprocesses inherit this) skip the CPU bf16 detection
# that would make bf16 the SFT default on CPUs with fast bf16 matmul (medtrain/hardware.py; its own tests mock it).
os.environ.setdefault("MEDTRAIN_CPU_BF16", "0")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Merged vs unmerged LoRA models in float32: folding B @ A into the base weight reorders sums, so outputs agree to
# ~2e-5 (measured on tiny models: logits, reward scores ~4); a lost adapter or head moves them by far more.
MERGE_ATOL = 1e-4
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The patient has a fever and a cough. Drink water, rest, and see a doctor if it lasts more than three days.",
    "Hypertension means high blood pressure. Reduce salt, exercise, and take medicine as prescribed.",
    "Diabetes affects blood sugar. Check glucose often and follow the diet plan.",
    "发烧时多喝水，注意休息。如果持续高烧，请及时就医。高血压患者应少吃盐，按时服药。",
    "USER: ASSISTANT: A chat between a curious user and an artificial intelligence assistant. system user assistant",
    "### Instruction: ### Response: [INST] [/INST] <<SYS>> <</SYS>> Human: Assistant: 0123456789 ,.?!:;'\"()-\n",
]


def shared_path(*parts: str) -> Path:
    return SHARED.joinpath(*parts)


requires_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (real tokenizers/datasets) is absent")


def build_tokenizer(path: Path, chat_template: str | None = None, vocab_size: int = 400):
    """A small byte-level BPE tokenizer trained on a few medical sentences, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    if chat_template:
        fast.chat_template = chat_template
        fast.eos_token = "<|im_end|>"
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0, tie: bool = False):
    """A tiny randomly initialised LlamaForCausalLM saved to ``path`` (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama + BPE tokenizer without a chat template (templates come from template.py)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model(path, build_tokenizer(path))
    return path


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has a ChatML chat template and eos <|im_end|>."""
    path = tmp_path_factory.mktemp("tiny-llama-chat")
    build_model(path, build_tokenizer(path, chat_template=CHATML_TEMPLATE))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: thread hand-offs dominate at this size, and two threads on a shared
    2-core machine thrash (5x slower). Opt in per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as JSON Lines (UTF-8, non-ASCII kept) at ``path``, parent directories created; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 600, cwd: Path = ROOT):
    """Run a stage script in a subprocess; returns CompletedProcess (text)."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)
