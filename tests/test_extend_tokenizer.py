"""extend_tokenizer.py: word-list terms, BPE merges continued from the tokenizer's segmentation, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_tokenizer, requires_shared, run_script, shared_path

from extend_tokenizer import ExtendTokenizerArguments, add_terms, extend_tokenizer, learn_merges, read_terms


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base-tokenizer")
    build_tokenizer(path)
    return path


def _load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([i]) for i in tokenizer.encode(text, add_special_tokens=False)]


def test_read_terms_strips_skips_blank_lines_and_duplicates(tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text("\ufeff高血压\n  冠心病 \n\n高血压\nxqzk\n", encoding="utf-8")
    assert read_terms(str(path)) == ["高血压", "冠心病", "xqzk"]


def test_add_terms_adds_only_multi_token_terms(base_dir):
    tokenizer = _load(base_dir)
    assert len(tokenizer) == 400
    assert tokenizer.encode("a", add_special_tokens=False) == [70]  # already one token: not added
    added = add_terms(tokenizer, ["xqzk", "a", "冠心病"])
    assert added == ["xqzk", "冠心病"]
    assert tokenizer.encode("xqzk", add_special_tokens=False) == [400]
    assert tokenizer.encode("冠心病", add_special_tokens=False) == [401]
    assert len(tokenizer) == 402


def test_learn_merges_continues_bpe_from_the_base_segmentation(base_dir):
    tokenizer = _load(base_dir)
    assert _pieces(tokenizer, "xqzk xqzk") == ["x", "q", "z", "k", " ", "x", "q", "z", "k"]  # precondition
    # words: "xqzk" x5 and "Ġxqzk" x5. Pair counts (x,q)=(q,z)=(z,k)=10, (Ġ,x)=5; ties go to the smaller pair.
    merges = learn_merges(tokenizer, ["xqzk xqzk"] * 5, num_merges=10, min_frequency=2)
    assert merges == [("q", "z"), ("qz", "k"), ("x", "qzk"), ("Ġ", "xqzk")]
    assert learn_merges(tokenizer, ["xqzk xqzk"] * 5, num_merges=2) == [("q", "z"), ("qz", "k")]
    # min_frequency 6 stops before (Ġ, xqzk), which occurs 5 times
    assert learn_merges(tokenizer, ["xqzk xqzk"] * 5, num_merges=10, min_frequency=6) == merges[:3]


def test_extended_tokenizer_keeps_old_ids_and_uses_new_tokens(base_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("xqzk xqzk\n" * 5, encoding="utf-8")
    (tmp_path / "terms.txt").write_text("冠心病\na\n", encoding="utf-8")
    out = tmp_path / "out"
    summary = extend_tokenizer(ExtendTokenizerArguments(
        tokenizer_name_or_path=str(base_dir), output_dir=str(out), word_file=str(tmp_path / "terms.txt"),
        corpus=str(corpus), num_new_merges=10,
    ))
    assert summary["base_vocab_size"] == 400 and summary["vocab_size"] == 405
    assert (summary["new_merges"], summary["new_terms"], summary["terms_already_single_tokens"]) == (4, 1, 1)
    assert summary["sample_tokens_before"] == 5 * 9 and summary["sample_tokens_after"] == 5 * 2

    base, extended = _load(base_dir), _load(out)
    new_vocab = extended.get_vocab()
    assert all(new_vocab[token] == i for token, i in base.get_vocab().items())  # every old token keeps its id
    assert {t: new_vocab[t] for t in ("qz", "qzk", "xqzk", "Ġxqzk", "冠心病")} == {
        "qz": 400, "qzk": 401, "xqzk": 402, "Ġxqzk": 403, "冠心病": 404}
    assert extended.encode("xqzk xqzk", add_special_tokens=False) == [402, 403]
    assert extended.encode("冠心病", add_special_tokens=False) == [404]
    # text the corpus never showed is segmented exactly as before
    text = "The patient has a fever and a cough."
    assert extended.encode(text, add_special_tokens=False) == base.encode(text, add_special_tokens=False)
    for sample in ("xqzk xqzk, qz xq zk!", "冠心病患者 xqzkx"):
        assert extended.decode(extended.encode(sample, add_special_tokens=False)) == sample
    assert json.loads((out / "extension_summary.json").read_text())["vocab_size"] == 405


def test_cli_prints_summary(base_dir, tmp_path):
    (tmp_path / "terms.txt").write_text("冠心病\n", encoding="utf-8")
    result = run_script("extend_tokenizer.py", "--tokenizer_name_or_path", str(base_dir),
                        "--word_file", str(tmp_path / "terms.txt"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "vocabulary 400 -> 401: 0 learned merges, 1 added terms (0 already single tokens)" in result.stdout
    assert _load(tmp_path / "out").encode("冠心病", add_special_tokens=False) == [400]


def _run_in_process(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    import extend_tokenizer as script
    from medtrain.entrypoint import run_main

    monkeypatch.setattr("sys.argv", ["extend_tokenizer.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        run_main(script.main)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["no_source", "bad_utf8", "empty_words", "non_empty_output"])
def test_bad_input_exits_2_with_one_message(base_dir, tmp_path, monkeypatch, capsys, case):
    words = tmp_path / "terms.txt"
    out = tmp_path / "out"
    args = ["--tokenizer_name_or_path", str(base_dir), "--output_dir", str(out), "--word_file", str(words)]
    words.write_text("冠心病\n", encoding="utf-8")
    if case == "no_source":
        args = args[:4]
        expected = "error: nothing to add: pass --word_file FILE and/or --corpus DIR."
    elif case == "bad_utf8":
        words.write_bytes("冠心病\n".encode("utf-8") + b"caf\xe9\n")
        expected = f"error: {words}:2: not valid UTF-8 (byte 0xe9 at offset 13); re-save the file as UTF-8"
    elif case == "empty_words":
        words.write_text("\n  \n", encoding="utf-8")
        expected = f"error: {words}: word list is empty (one term per line)"
    else:
        out.mkdir()
        (out / "keep.txt").write_text("x")
        expected = f"error: output_dir {out} exists and is not empty: choose another or pass --overwrite_output_dir."
    if case == "bad_utf8":  # one case through a real process: exit status and no traceback
        result = run_script("extend_tokenizer.py", *args)
        code, stderr = result.returncode, result.stderr
    else:
        code, stderr = _run_in_process(monkeypatch, capsys, args)
    assert code == 2
    assert stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in stderr
    if case == "non_empty_output":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()


@requires_shared
def test_learned_merges_on_a_real_tokenizer_with_added_tokens_after_the_vocabulary(tmp_path):
    """Qwen2.5: NFC normaliser, regex pre-tokenizer, 22 added tokens after the BPE vocabulary."""
    path = shared_path("tokenizers", "qwen2.5")
    if not path.is_dir():
        pytest.skip("../shared/tokenizers/qwen2.5 is absent")
    corpus = tmp_path / "zh.txt"
    corpus.write_text("室性心动过速需要紧急处理。\n阵发性室上性心动过速可用迷走神经刺激。\n" * 20, encoding="utf-8")
    out = tmp_path / "out"
    summary = extend_tokenizer(ExtendTokenizerArguments(
        tokenizer_name_or_path=str(path), output_dir=str(out), corpus=str(corpus), num_new_merges=8))
    base, extended = _load(path), _load(out)
    assert summary["new_merges"] == 8 and len(extended) == len(base) + 8 == 151665 + 8
    old_vocab, new_vocab = base.get_vocab(), extended.get_vocab()
    assert sorted(i for t, i in new_vocab.items() if t not in old_vocab) == list(range(151665, 151673))
    assert extended.convert_tokens_to_ids("<|im_end|>") == base.convert_tokens_to_ids("<|im_end|>")
    text = "阵发性室上性心动过速"
    assert len(extended.encode(text)) < len(base.encode(text))
    assert extended.decode(extended.encode(text)) == text
