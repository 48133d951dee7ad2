"""Continued pretraining: block layout, collation, caching, streaming, vocabulary extension, errors, training."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, build_model, build_tokenizer, run_script, shared_path

from medtrain.errors import DataError
from medtrain.formats import find_data_files
from medtrain.pretrain_data import (
    TEXT_EXTENSIONS,
    DocumentEncoder,
    PretrainCollator,
    PretrainDataArguments,
    iter_documents,
    load_pretrain_datasets,
    pack_documents,
    resolve_block_size,
)

SENTENCES = [
    "The patient has a fever and a cough.",
    "Drink water, rest, and see a doctor.",
    "Hypertension means high blood pressure.",
    "Diabetes affects blood sugar.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _args(train: Path, tmp_path: Path, **kw) -> PretrainDataArguments:
    return PretrainDataArguments(train_file_dir=str(train), cache_dir_data=str(tmp_path / "cache"), **kw)


def _corpus(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# Layout


def test_pack_documents_cuts_the_concatenation_into_blocks():
    docs = [[5, 6, 7, 2], [8, 9, 2], [10, 2]]  # documents already end with EOS (2)
    assert list(pack_documents(docs, 4)) == [[5, 6, 7, 2], [8, 9, 2, 10]]
    assert list(pack_documents(docs, 4, keep_remainder=True)) == [[5, 6, 7, 2], [8, 9, 2, 10], [2]]
    assert list(pack_documents(docs, 3)) == [[5, 6, 7], [2, 8, 9], [2, 10, 2]]  # exact fit: nothing left
    assert list(pack_documents([[1] * 9], 4, keep_remainder=True)) == [[1] * 4, [1] * 4, [1]]  # one long document
    assert list(pack_documents([[1, 2]], 4)) == []


def test_document_encoder_appends_eos_and_prepends_bos_only_when_the_tokenizer_does(tokenizer):
    from tokenizers.processors import TemplateProcessing

    eos = tokenizer.eos_token_id
    assert DocumentEncoder(tokenizer).encode(["a fever", "rest"]) == [
        _ids(tokenizer, "a fever") + [eos], _ids(tokenizer, "rest") + [eos]]
    bos_tokenizer = copy.deepcopy(tokenizer)
    bos_tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert DocumentEncoder(bos_tokenizer).encode(["rest"]) == [[1] + _ids(tokenizer, "rest") + [eos]]
    unpacked = DocumentEncoder(tokenizer, max_length=3)({"text": ["a fever and a cough", "a"]})
    assert unpacked == {"input_ids": [_ids(tokenizer, "a fever and a cough")[:3], _ids(tokenizer, "a") + [eos]],
                        "truncated": [True, False]}


def test_collator_masks_exactly_the_padding_even_when_pad_is_eos():
    collator = PretrainCollator(pad_token_id=2)  # pad == eos, as in SmolLM2
    batch = collator([{"input_ids": [5, 6, 2]}, {"input_ids": [7, 8, 9, 10, 2]}])
    assert batch["input_ids"].tolist() == [[5, 6, 2, 2, 2], [7, 8, 9, 10, 2]]
    assert batch["labels"].tolist() == [[5, 6, 2, -100, -100], [7, 8, 9, 10, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    packed = collator([{"input_ids": [5, 6, 2, 7]}, {"input_ids": [8, 2, 9, 10]}])
    assert packed["labels"].tolist() == packed["input_ids"].tolist() == [[5, 6, 2, 7], [8, 2, 9, 10]]
    assert PretrainCollator(0, pad_to_multiple_of=4)([{"input_ids": [5]}])["labels"].tolist() == [[5, -100, -100, -100]]


def test_txt_and_jsonl_documents_in_one_directory(tmp_path):
    data = tmp_path / "data"
    _corpus(data / "a.txt", ["first line", "", "second line"])
    _corpus(data / "sub" / "b.jsonl", ['{"text": "json one"}', "", '{"text": "json two", "id": 3}'])
    _corpus(data / "c.json", ['[{"text": "array"}]'])
    (tmp_path / "p.txt").write_text("para one\nstill one\n\n\npara two\n", encoding="utf-8")

    files = find_data_files(str(data), TEXT_EXTENSIONS)
    assert [Path(f).name for f in files] == ["a.txt", "c.json", "b.jsonl"]
    assert list(iter_documents(files)) == ["first line", "second line", "array", "json one", "json two"]
    assert list(iter_documents([str(tmp_path / "p.txt")], "blank_line")) == ["para one\nstill one", "para two"]


def test_skip_invalid_samples_skips_each_bad_record_with_a_warning(tmp_path, caplog):
    bad_jsonl = _corpus(tmp_path / "a.jsonl", ['{"text": "one"}', "{broken", '{"id": 1}', '{"text": "two"}'])
    bad_txt = tmp_path / "b.txt"
    bad_txt.write_bytes(b"three\ncaf\xe9\nfour\n")
    empty = _corpus(tmp_path / "c.txt", [""])
    with caplog.at_level(logging.WARNING, logger="medtrain.pretrain_data"):
        docs = list(iter_documents([str(bad_jsonl), str(bad_txt), str(empty)], skip_invalid=True))
    assert docs == ["one", "two", "three", "four"]
    assert caplog.messages == [
        f"skipped: {bad_jsonl}:2: invalid JSON (Expecting property name enclosed in double quotes)",
        f'skipped: {bad_jsonl}:3: no "text" field (pretraining records look like {{"text": "..."}}; keys here: [\'id\'])',
        f"skipped: {bad_txt}:2: not valid UTF-8 (byte 0xe9); re-save the file as UTF-8",
        f"skipped: {empty}: file is empty (no text to train on)",
    ]


def test_dataset_name_reads_the_text_column(tokenizer, tmp_path):
    local = _corpus(tmp_path / "local-dataset" / "train.jsonl", [json.dumps({"text": s}) for s in SENTENCES[:2]])
    args = PretrainDataArguments(dataset_name=str(local.parent), cache_dir_data=str(tmp_path / "cache"), block_size=8,
                                 keep_remainder=True)
    stream = [t for s in SENTENCES[:2] for t in _ids(tokenizer, s) + [tokenizer.eos_token_id]]
    train, _ = load_pretrain_datasets(args, tokenizer, 8)
    assert list(train["input_ids"]) == [stream[i : i + 8] for i in range(0, len(stream), 8)]
    args.streaming, args.shuffle_buffer_size = True, 0
    train, _ = load_pretrain_datasets(args, tokenizer, 8)
    assert [row["input_ids"] for row in train] == [stream[i : i + 8] for i in range(0, len(stream), 8)]


def test_packed_dataset_layout_end_to_end(tokenizer, tmp_path):
    data = tmp_path / "data"
    _corpus(data / "a.txt", SENTENCES[:2])
    _corpus(data / "b.jsonl", [json.dumps({"text": SENTENCES[2]})])
    stream = [t for s in SENTENCES[:3] for t in _ids(tokenizer, s) + [tokenizer.eos_token_id]]
    n = len(stream) // 8 * 8
    train, eval_ = load_pretrain_datasets(_args(data, tmp_path, block_size=8), tokenizer, 8)
    assert eval_ is None
    assert list(train["input_ids"]) == [stream[i : i + 8] for i in range(0, n, 8)]
    train, _ = load_pretrain_datasets(_args(data, tmp_path, block_size=8, keep_remainder=True), tokenizer, 8)
    assert train["input_ids"][-1] == stream[n:] and len(stream) % 8  # the shorter last block is kept


def test_unpacked_dataset_truncates_each_document_and_pads_only_in_the_batch(tokenizer, tmp_path):
    data = _corpus(tmp_path / "data" / "a.txt", ["a fever", SENTENCES[0]])
    train, _ = load_pretrain_datasets(_args(data.parent, tmp_path, block_size=6, packing=False), tokenizer, 6)
    eos = tokenizer.eos_token_id
    short, long = _ids(tokenizer, "a fever") + [eos], _ids(tokenizer, SENTENCES[0])[:6]
    assert list(train["input_ids"]) == [short, long]
    batch = PretrainCollator(tokenizer.pad_token_id)(list(train))
    assert batch["labels"].tolist() == [short + [-100] * (6 - len(short)), long]


def test_validation_split_holds_out_documents(tokenizer, tmp_path):
    data = _corpus(tmp_path / "data" / "a.txt", [f"{s} {i}" for i in range(10) for s in SENTENCES[:1]])
    args = _args(data.parent, tmp_path, block_size=4, validation_split_percentage=20, keep_remainder=True)
    train, eval_ = load_pretrain_datasets(args, tokenizer, 4, seed=1)
    # 10 documents: 2 held out; every token of every document lands in exactly one split
    per_doc = len(_ids(tokenizer, f"{SENTENCES[0]} 0")) + 1
    assert sum(map(len, train["input_ids"])) == 8 * per_doc and sum(map(len, eval_["input_ids"])) == 2 * per_doc


def test_block_size_is_capped_at_the_model_length(caplog):
    from transformers import LlamaConfig

    from medtrain.arguments import ModelArguments
    from pretraining import trainable_length

    caplog.clear()  # importing pretraining may log from third-party imports (bitsandbytes' kernel lookup)
    with caplog.at_level(logging.WARNING):
        assert resolve_block_size(4096, 512) == 512
    assert caplog.messages == ["--block_size 4096 is larger than the model supports (512 positions); using 512"]
    assert resolve_block_size(256, 512) == 256
    assert resolve_block_size(4096, None) == 4096
    config = LlamaConfig(max_position_embeddings=512)
    assert trainable_length(config, ModelArguments()) == 512
    assert trainable_length(config, ModelArguments(rope_scaling="linear", rope_scaling_factor=4.0)) == 2048
    assert trainable_length(config, ModelArguments(rope_scaling="linear")) is None  # factor follows the block size


# --------------------------------------------------------------------------------------------------------------
# Caching and streaming


def test_second_load_reads_the_cache_and_changes_invalidate_it(tokenizer, tmp_path, caplog):
    data = _corpus(tmp_path / "data" / "a.txt", SENTENCES * 3)
    args = _args(data.parent, tmp_path, block_size=8)

    def load(**kw) -> tuple[list, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="medtrain.pretrain_data"):
            train, _ = load_pretrain_datasets(args, kw.get("tok", tokenizer), kw.get("block", 8))
        hit = any(m.startswith("loaded tokenized data from cache") for m in caplog.messages)
        return list(train["input_ids"]), "hit" if hit else "built"

    first, how = load()
    assert how == "built"
    assert load() == (first, "hit")
    assert load(block=6)[1] == "built"  # block settings are part of the key
    data.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")  # size and mtime change
    assert load()[1] == "built"
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["xqzk"])
    assert load(tok=other)[1] == "built"
    args.overwrite_cache = True
    assert load()[1] == "built"


def test_streaming_is_lazy(tokenizer, tmp_path):
    import datasets

    data = tmp_path / "data" / "a.txt"
    data.parent.mkdir()
    # a non-UTF-8 byte on line 401: reading the first blocks must not reach it
    data.write_bytes(("\n".join(SENTENCES * 100) + "\n").encode("utf-8") + b"bad \xff line\n")
    args = _args(data.parent, tmp_path, block_size=8, streaming=True, shuffle_buffer_size=0)
    train, _ = load_pretrain_datasets(args, tokenizer, 8)
    assert isinstance(train, datasets.IterableDataset)
    stream = [t for s in SENTENCES for t in _ids(tokenizer, s) + [tokenizer.eos_token_id]]
    assert [row["input_ids"] for row in train.take(2)] == [stream[:8], stream[8:16]]
    with pytest.raises(DataError, match=r"a\.txt:401: not valid UTF-8 \(byte 0xff\)"):
        list(train)
    assert not (tmp_path / "cache").exists()  # nothing cached in streaming mode


# --------------------------------------------------------------------------------------------------------------
# Bad input: one message, exit 2, output_dir untouched


def _run_in_process(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    import pretraining
    from medtrain.entrypoint import run_main

    monkeypatch.setattr("sys.argv", ["pretraining.py", *args])
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "unused")
    with pytest.raises(SystemExit) as exit_info:
        run_main(pretraining.main)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["empty_file", "jsonl_without_text", "not_utf8", "streaming_without_max_steps",
                                  "block_size_1"])
def test_bad_input_exits_2_with_one_message(tiny_model_dir, tmp_path, monkeypatch, capsys, case):
    data = tmp_path / "data"
    _corpus(data / "a.txt", SENTENCES)
    out = tmp_path / "out"
    extra: list[str] = []
    if case == "empty_file":
        bad = data / "empty.txt"
        bad.write_text("\n  \n", encoding="utf-8")
        expected = f"error: {bad}: file is empty (no text to train on)"
    elif case == "jsonl_without_text":
        bad = _corpus(data / "b.jsonl", ['{"text": "ok"}', '{"content": "no text"}'])
        expected = (f"error: {bad}:2: no \"text\" field (pretraining records look like {{\"text\": \"...\"}}; "
                    "keys here: ['content'])")
    elif case == "not_utf8":
        bad = data / "c.txt"
        bad.write_bytes(b"fine\ncaf\xe9\n")
        expected = f"error: {bad}:2: not valid UTF-8 (byte 0xe9); re-save the file as UTF-8"
    elif case == "streaming_without_max_steps":
        extra = ["--streaming"]
        expected = ("error: --streaming needs --max_steps N: a stream has no length, so the number of steps cannot "
                    "be derived from epochs.")
    else:
        extra = ["--block_size", "1"]
        expected = "error: --block_size must be at least 2 (one token and its successor), got 1."
    code, stderr = _run_in_process(monkeypatch, capsys, [
        "--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(data), "--output_dir", str(out),
        "--cache_dir_data", str(tmp_path / "cache"), *extra])
    assert code == 2
    assert stderr.strip().splitlines()[-1] == expected
    assert not out.exists()


def test_bad_input_in_a_real_process_has_no_traceback(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    bad = _corpus(data / "b.jsonl", ['{"text": 7}'])
    result = run_script("pretraining.py", "--model_name_or_path", str(tiny_model_dir), "--train_file_dir", str(data),
                        "--output_dir", str(tmp_path / "out"), "--cache_dir_data", str(tmp_path / "cache"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {bad}:1: text: expected a string, got int"
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# Training runs (tiny model, subprocess)


def _train(model_dir: Path, data: Path, out: Path, tmp_path: Path, *extra: str):
    result = run_script(
        "pretraining.py", "--model_name_or_path", str(model_dir), "--train_file_dir", str(data),
        "--output_dir", str(out), "--cache_dir_data", str(tmp_path / "cache"), "--block_size", "32",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--logging_steps", "5",
        "--save_strategy", "no", "--report_to", "none", "--seed", "0", *extra,
        env={"OMP_NUM_THREADS": "1"},  # a tiny model gains nothing from threads; on a busy machine they cost
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _eval_losses(out: Path) -> list[float]:
    """Eval losses logged during training (trainer.evaluate() after training is in eval_results.json)."""
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]


def test_full_training_lowers_held_out_perplexity(tiny_model_dir, tmp_path):
    data = _corpus(tmp_path / "train" / "a.txt", SENTENCES * 40)
    heldout = _corpus(tmp_path / "heldout" / "b.txt", list(reversed(SENTENCES)) * 2)
    out = tmp_path / "out"
    result = _train(tiny_model_dir, data.parent, out, tmp_path, "--validation_file_dir", str(heldout.parent),
                    "--use_peft", "False", "--learning_rate", "5e-3", "--max_steps", "40", "--eval_on_start")
    assert "tokenized data cached in" in result.stdout
    (before,) = _eval_losses(out)  # --eval_on_start: step 0, before any update
    results = dict(line.split(" = ") for line in (out / "eval_results.txt").read_text().splitlines())
    after = float(results["eval_loss"])
    assert float(results["perplexity"]) == pytest.approx(math.exp(after))
    assert float(results["perplexity_at_start"]) == pytest.approx(math.exp(before))
    assert math.exp(after) <= 0.7 * math.exp(before), (math.exp(before), math.exp(after))
    assert 0.0 <= float(results["eval_accuracy"]) <= 1.0
    assert float(results["eval_accuracy"]) > 0.5  # a repetitive corpus: most next tokens become predictable
    assert json.loads((out / "eval_results.json").read_text())["perplexity"] == pytest.approx(math.exp(after))
    assert (out / "model.safetensors").is_file() and (out / "train_results.txt").is_file()


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_the_adapter_depends_on_the_seed_and_not_on_the_cache(tiny_model_dir, tmp_path):
    # With learning rate 0 the saved adapter is the initial one: it must depend on --seed alone, not on whether the
    # run tokenised the corpus or read the cache (start_run seeds before the adapter is built).
    data = _corpus(tmp_path / "train" / "a.txt", SENTENCES * 20)
    runs = {}
    for name, seed in (("tokenised", "0"), ("cached", "0"), ("other_seed", "1")):
        result = _train(tiny_model_dir, data.parent, tmp_path / name, tmp_path, "--max_steps", "1",
                        "--learning_rate", "0", "--seed", seed)
        runs[name] = (result.stdout + result.stderr, _adapter(tmp_path / name))
    assert "tokenized data cached in" in runs["tokenised"][0]
    assert "loaded tokenized data from cache" in runs["cached"][0]
    tokenised, cached, other = (runs[name][1] for name in ("tokenised", "cached", "other_seed"))
    lora_a = [key for key in tokenised if "lora_A" in key]
    assert lora_a and tokenised.keys() == cached.keys() == other.keys()
    for key in tokenised:
        assert torch.equal(tokenised[key], cached[key]), key
    assert all(not torch.equal(tokenised[key], other[key]) for key in lora_a)


def test_streaming_trains_for_max_steps(tiny_model_dir, tmp_path):
    data = _corpus(tmp_path / "train" / "a.txt", SENTENCES * 20)
    heldout = _corpus(tmp_path / "heldout" / "b.txt", SENTENCES)
    out = tmp_path / "out"
    result = _train(tiny_model_dir, data.parent, out, tmp_path, "--streaming", "--max_steps", "3",
                    "--validation_file_dir", str(heldout.parent), "--use_peft", "False")
    assert "streaming: documents are read, tokenised and packed while training (no cache)" in result.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    assert "perplexity" in json.loads((out / "eval_results.json").read_text())
    assert not (tmp_path / "cache").exists()


def test_vocabulary_extension_trains_and_saves_the_new_rows(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from extend_tokenizer import add_terms
    from medtrain.modeling import resize_embeddings_to

    base_dir = tmp_path / "base"
    build_model(base_dir, build_tokenizer(base_dir))
    extended = AutoTokenizer.from_pretrained(str(base_dir))
    assert add_terms(extended, ["xqzk"]) == ["xqzk"]
    extended.save_pretrained(tmp_path / "tok")
    new_id = 400
    corpus = [f"Code xqzk means a cough. {s}" for s in SENTENCES] * 20
    data = _corpus(tmp_path / "train" / "a.txt", corpus)
    out = tmp_path / "out"
    _train(base_dir, data.parent, out, tmp_path, "--tokenizer_name_or_path", str(tmp_path / "tok"),
           "--modules_to_save", "embed_tokens,lm_head", "--learning_rate", "1e-2", "--max_steps", "30",
           "--do_eval", "False")

    saved = AutoTokenizer.from_pretrained(str(out))
    assert len(saved) == 401 and saved.encode("Code xqzk", add_special_tokens=False)[-1] == new_id

    def load(adapter: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(base_dir))
        resize_embeddings_to(model, saved)
        return PeftModel.from_pretrained(model, str(out)).merge_and_unload() if adapter else model

    base, trained = load(adapter=False), load(adapter=True)
    for get in ("get_input_embeddings", "get_output_embeddings"):
        old_row, new_row = getattr(base, get)().weight[new_id], getattr(trained, get)().weight[new_id]
        assert (new_row - old_row).abs().max() > 1e-2, get  # trained and saved in the adapter
    # used: after training, the model expects the new token where the corpus puts it
    ids = torch.tensor([saved.encode("Code xqzk", add_special_tokens=False)])
    with torch.no_grad():
        probs_base, probs_trained = (m(ids[:, :-1]).logits[0, -1].softmax(-1) for m in (base, trained))
    assert probs_trained.argmax().item() == new_id
    assert probs_trained[new_id] > 50 * probs_base[new_id], (probs_base[new_id], probs_trained[new_id])


# --------------------------------------------------------------------------------------------------------------
# Real model and corpus (slow)


@pytest.mark.slow
def test_smollm2_on_real_medical_text_lowers_perplexity(tmp_path):
    model = ROOT / "models" / "SmolLM2-135M-Instruct"
    corpus = shared_path("data", "medical-zh", "pretrain", "fever.txt")
    if not (model / "config.json").is_file():
        pytest.skip("models/SmolLM2-135M-Instruct is absent (run prepare_model.py)")
    if not corpus.is_file():
        pytest.skip("../shared/data/medical-zh/pretrain/fever.txt is absent")
    data = tmp_path / "data"
    data.mkdir()
    (data / "fever.txt").symlink_to(corpus)
    out = tmp_path / "out"
    result = run_script(
        "pretraining.py", "--model_name_or_path", str(model), "--train_file_dir", str(data),
        "--validation_split_percentage", "5", "--block_size", "256", "--max_train_samples", "32",
        "--max_eval_samples", "8", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
        "--max_steps", "16", "--learning_rate", "5e-4", "--eval_on_start", "--save_strategy", "no",
        "--report_to", "none", "--output_dir", str(out), "--cache_dir_data", str(tmp_path / "cache"),
        timeout=3600,  # a few minutes on an idle 2-core machine; far more on a shared one
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    before, after = results["perplexity_at_start"], results["perplexity"]
    print(f"SmolLM2-135M-Instruct on fever.txt: held-out perplexity {before:.2f} -> {after:.2f}")
    assert after < before
