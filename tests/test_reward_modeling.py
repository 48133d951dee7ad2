"""Reward modelling on tiny models: pair encoding per format, the pairwise loss, learning a synthetic preference,
exact reloads (adapter with its score head, merged and full models), padding, and clear errors for bad input."""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch

from conftest import MERGE_ATOL, ROOT, requires_shared, run_script, shared_path, write_jsonl
from medtrain.chat_format import get_chat_format, load_recorded_chat_format
from medtrain.entrypoint import run_main
from medtrain.formats import load_preferences
from medtrain.preference import encode_pairs, render_pair
from medtrain.reward import (
    RewardScorer,
    describe_pair,
    load_reward_model,
    load_reward_scorer,
    pair_metrics,
    pair_rows,
    pairwise_loss,
    score_position,
)

ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_chat(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer, get_chat_format(tokenizer, None)


# ----------------------------------------------------------------------------------------------------------------
# Formats and encoding

Q, C, R = "I have a fever.", "Drink water.", "Take salt."
HISTORY = [("system", "You are a doctor."), ("user", "Hello."), ("assistant", "Hi, how can I help?"), ("user", Q)]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}

SINGLE_TURN = {
    "conversations_str": {"conversations": [{"from": "human", "value": Q}], "chosen": C, "rejected": R},
    "question": {"question": Q, "response_chosen": C, "response_rejected": R},
    "conversations_turn": {"conversations": [{"from": "human", "value": Q}],
                           "chosen": {"from": "gpt", "value": C}, "rejected": {"from": "gpt", "value": R}},
    "prompt_str": {"prompt": Q, "chosen": C, "rejected": R},
    "prompt_messages": {"prompt": [{"role": "user", "content": Q}], "chosen": [{"role": "assistant", "content": C}],
                        "rejected": [{"role": "assistant", "content": R}]},
}
MULTI_TURN = {
    "conversations_str": {"conversations": [{"from": SHAREGPT_ROLE[r], "value": t} for r, t in HISTORY],
                          "chosen": C, "rejected": R},
    "conversations_turn": {"conversations": [{"from": SHAREGPT_ROLE[r], "value": t} for r, t in HISTORY],
                           "chosen": {"from": "gpt", "value": C}, "rejected": {"from": "gpt", "value": R}},
    "prompt_messages": {"prompt": [{"role": r, "content": t} for r, t in HISTORY], "chosen": C, "rejected": R},
}


@pytest.mark.parametrize("variants", [SINGLE_TURN, MULTI_TURN], ids=["single_turn", "multi_turn"])
def test_every_preference_format_renders_the_same_pair_and_ids(tiny_chat_model_dir, tmp_path, variants):
    tokenizer, fmt = tiny_chat(tiny_chat_model_dir)
    texts, ids = {}, {}
    for name, row in variants.items():
        records = load_preferences([str(write_jsonl(tmp_path / f"{name}.jsonl", [row]))])
        texts[name] = render_pair(fmt, records[0])
        ids[name] = encode_pairs(records, tokenizer, fmt, max_length=512)[0]
        ids[name].pop("source")
    reference = next(iter(variants))
    for name in variants:
        assert texts[name] == texts[reference], name
        assert ids[name] == ids[reference], name
    pieces, chosen, rejected = texts[reference]
    assert (chosen, rejected) == (C + "<|im_end|>", R + "<|im_end|>")
    prompt = "".join(p + a for p, a in pieces)
    if variants is MULTI_TURN:  # the history is kept in the prompt, in order
        assert prompt == ("<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nHello.<|im_end|>\n"
                          "<|im_start|>assistant\nHi, how can I help?<|im_end|>\n<|im_start|>user\nI have a fever."
                          "<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert prompt == "<|im_start|>user\nI have a fever.<|im_end|>\n<|im_start|>assistant\n"


def test_exact_token_layout_of_one_pair(tiny_chat_model_dir):
    tokenizer, fmt = tiny_chat(tiny_chat_model_dir)
    record = {"messages": [{"role": "user", "content": Q}], "chosen": C, "rejected": R, "margin": 0.5}
    pair = encode_pairs([record], tokenizer, fmt, max_length=512)[0]
    pieces = {k: tokenizer.convert_ids_to_tokens(pair[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    # byte-level BPE: "Ġ" is a space, "Ċ" a newline; <|im_start|> = 4, <|im_end|> = 5 (eos), <pad> = 0
    assert pieces["prompt_ids"] == ["<|im_start|>", "us", "er", "Ċ", "I", "Ġh", "a", "v", "e", "Ġa", "Ġ", "fe", "v",
                                    "er", ".", "<|im_end|>", "Ċ", "<|im_start|>", "a", "ssistant", "Ċ"]
    assert pair["prompt_ids"] == [4, 285, 265, 204, 46, 322, 70, 91, 74, 262, 226, 309, 91, 265, 19, 5, 204, 4, 70,
                                  298, 204]
    assert pieces["chosen_ids"] == ["Dri", "nk", "Ġ", "w", "at", "er", ".", "<|im_end|>"]
    assert pair["chosen_ids"] == [353, 398, 226, 92, 276, 265, 19, 5]
    assert pieces["rejected_ids"] == ["T", "ak", "e", "Ġs", "al", "t", ".", "<|im_end|>"]
    assert pair["rejected_ids"] == [57, 363, 74, 295, 306, 89, 19, 5]
    assert pair["margin"] == 0.5
    # RewardTrainer rows are the full sequences: prompt + reply
    assert pair_rows([pair]) == [{"chosen_ids": pair["prompt_ids"] + pair["chosen_ids"],
                                  "rejected_ids": pair["prompt_ids"] + pair["rejected_ids"], "margin": 0.5}]
    # the reward is read at the last non-pad token: <|im_end|> here (pad is <pad>) ...
    assert describe_pair(tokenizer, pair) == (
        "pair layout: prompt 21 tok, chosen 8 tok, rejected 8 tok, margin 0.5\n"
        "  [prompt  ] '<|im_start|>user\\nI have a fever.<|im_end|>\\n<|im_start|>assistant\\n'\n"
        "  [chosen  ] 'Drink water.<|im_end|>'  (reward read at token 28: '<|im_end|>')\n"
        "  [rejected] 'Take salt.<|im_end|>'  (reward read at token 28: '<|im_end|>')"
    )
    # ... and the "." before it when the tokenizer pads with its end-of-turn token (as SmolLM2 does)
    assert score_position(pair["prompt_ids"] + pair["chosen_ids"], pad_token_id=5) == 27


def test_over_long_pairs_are_cut_from_the_left_of_the_prompt_or_dropped(tiny_chat_model_dir, caplog):
    tokenizer, fmt = tiny_chat(tiny_chat_model_dir)
    short = {"messages": [{"role": "user", "content": Q}], "chosen": C, "rejected": R}
    long = {"messages": [{"role": "user", "content": "fever " * 20 + Q}], "chosen": C, "rejected": R}
    full = encode_pairs([long], tokenizer, fmt, max_length=512)[0]
    kept = encode_pairs([short, long], tokenizer, fmt, max_length=30, truncation="left")
    assert len(kept) == 2 and kept[1]["prompt_ids"] == full["prompt_ids"][-22:]  # 30 - 8 reply tokens
    assert kept[1]["chosen_ids"] == full["chosen_ids"] and kept[1]["rejected_ids"] == full["rejected_ids"]
    assert "1 of 2 preference pairs longer than 30 tokens: 1 prompt(s) truncated from the left, 0 pair(s) dropped" \
        in caplog.text
    dropped = encode_pairs([short, long], tokenizer, fmt, max_length=30, truncation="drop", stage="rm")
    assert len(dropped) == 1 and "0 prompt(s) truncated from the left, 1 pair(s) dropped" in caplog.text
    assert "to keep the 1 dropped pair(s): raise --model_max_length (a reward model reads its score at the reply's " \
           "end, so replies are never cut)" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Loss and metrics, by hand


def test_pairwise_loss_and_metrics_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(0) = log 2 = 0.693147
    assert pairwise_loss(chosen, rejected).item() == pytest.approx((0.313262 + 0.693147) / 2, abs=1e-6)
    # a margin of 1 on the second pair: -log sigmoid(0 - 0 - 1) = log(1 + e) = 1.313262
    assert pairwise_loss(chosen, rejected, torch.tensor([0.0, 1.0])).item() == pytest.approx(
        (0.313262 + 1.313262) / 2, abs=1e-6)
    metrics = pair_metrics(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0]))
    assert metrics == pytest.approx({"accuracy": 1 / 3, "chosen_reward": 1.0, "rejected_reward": 4 / 3,
                                     "reward_margin": -1 / 3})  # the tie (0 vs 0) counts as wrong


# ----------------------------------------------------------------------------------------------------------------
# Learning a synthetic preference end to end (script in a subprocess), then reloading it exactly

FILLER = ("the patient has a fever and cough rest see doctor if it lasts more than three days reduce salt exercise "
          "take medicine check blood sugar").split()
QUESTIONS = ["I have a fever.", "What about blood pressure?", "Diabetes diet?", "A cough for three days.", "Rest?"]


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Chosen replies contain the word "water", rejected ones (other random words) never do."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), "water")
        rejected = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        rows.append({"conversations": [{"from": "human", "value": rng.choice(QUESTIONS)}],
                     "chosen": " ".join(words), "rejected": " ".join(rejected)})
    return rows


def rm_args(model_dir, train_dir, out_dir, *extra) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--train_file_dir", str(train_dir), "--output_dir", str(out_dir),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--logging_steps", "8",
            "--save_strategy", "no", "--seed", "0", *extra]


def run_rm(*args: str):
    import reward_modeling

    return reward_modeling.main(list(args))


@pytest.fixture(scope="module")
def trained(tiny_chat_model_dir, tmp_path_factory):
    """A LoRA reward model trained by the script on the synthetic task, with predictions on held-out data."""
    root = tmp_path_factory.mktemp("rm")
    held_out = synthetic_pairs(48, seed=2)
    write_jsonl(root / "train" / "pairs.jsonl", synthetic_pairs(192, seed=1))
    write_jsonl(root / "val" / "pairs.jsonl", held_out)
    # the chosen side of each held-out pair again, as an SFT conversation (scored alone)
    write_jsonl(root / "predict" / "conversations.jsonl",
                [{"conversations": r["conversations"] + [{"from": "gpt", "value": r["chosen"]}]} for r in held_out])
    write_jsonl(root / "predict" / "pairs.jsonl", held_out)
    out = root / "out"
    trainer = run_rm(*rm_args(
        tiny_chat_model_dir, root / "train", out, "--validation_file_dir", str(root / "val"), "--num_train_epochs", "1",
        "--learning_rate", "1e-2", "--eval_strategy", "epoch", "--eval_on_start", "True",
        "--do_predict", "--predict_file", str(root / "predict")))
    return {"out": out, "model": tiny_chat_model_dir, "held_out": held_out, "trainer": trainer,
            "predict": root / "predict"}


def read_results(path: Path) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in path.read_text().splitlines())


def predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_learns_the_synthetic_preference(trained):
    out = trained["out"]
    history = trained["trainer"].state.log_history
    evals = [e for e in history if "eval_accuracy" in e]
    before, after = evals[0]["eval_accuracy"], float(read_results(out / "eval_results.txt")["eval_accuracy"])
    assert after >= 0.9 and before < 0.8, (before, after)
    results = read_results(out / "eval_results.txt")
    assert {"eval_loss", "eval_accuracy", "eval_chosen_reward", "eval_rejected_reward", "eval_reward_margin",
            "eval_samples"} <= set(results)
    assert float(results["eval_reward_margin"]) == pytest.approx(
        float(results["eval_chosen_reward"]) - float(results["eval_rejected_reward"]), abs=1e-4)
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] == after
    # --eval_strategy epoch evaluated the last step: those metrics are the final ones, not a second evaluation
    assert [e["step"] for e in evals] == [0, trained["trainer"].state.global_step]
    final = json.loads((out / "eval_results.json").read_text())
    assert {k: final[k] for k in ("eval_loss", "eval_accuracy", "eval_reward_margin")} == {
        k: evals[-1][k] for k in ("eval_loss", "eval_accuracy", "eval_reward_margin")}
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(out / "logs") for name in files)


def test_adapter_is_saved_with_its_trained_score_head(trained):
    from safetensors import safe_open

    out = trained["out"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        assert "base_model.model.score.weight" in fh.keys()
    assert load_recorded_chat_format(str(out)) == {"kind": "tokenizer", "template_name": None, "system_prompt": None}


def test_predictions_cover_pairs_and_conversations_consistently(trained):
    rows = predictions(trained["out"])
    conversations, pairs = rows[:48], rows[48:]  # files are read in sorted order
    assert [r["source"].rsplit("/", 1)[-1] for r in (rows[0], rows[48])] == ["conversations.jsonl:1", "pairs.jsonl:1"]
    assert set(conversations[0]) == {"source", "messages", "reward"}
    assert set(pairs[0]) == {"source", "messages", "chosen", "rejected", "chosen_reward", "rejected_reward"}
    # a conversation scores exactly like the chosen side of the pair with the same prompt and reply
    for conversation, pair in zip(conversations, pairs):
        assert conversation["reward"] == pytest.approx(pair["chosen_reward"], abs=ATOL)
    accuracy = sum(p["chosen_reward"] > p["rejected_reward"] for p in pairs) / len(pairs)
    predict = read_results(trained["out"] / "predict_results.txt")
    assert float(predict["predict_accuracy"]) == pytest.approx(accuracy)
    assert float(predict["predict_accuracy"]) == float(read_results(trained["out"] / "eval_results.txt")["eval_accuracy"])


def held_out_records(trained, tmp_path) -> list[dict]:
    return load_preferences([str(write_jsonl(tmp_path / "held_out.jsonl", trained["held_out"]))])


def test_adapter_and_merged_model_reload_with_identical_scores(trained, tmp_path):
    records = held_out_records(trained, tmp_path)
    in_memory = trained["trainer"].model
    tokenizer, fmt = tiny_chat(trained["out"])
    expected = torch.cat(RewardScorer(in_memory, tokenizer, fmt, batch_size=16).score_pairs(records))
    pairs = predictions(trained["out"])[48:]  # written by the same in-memory model at the end of the run
    assert torch.allclose(torch.tensor([p["chosen_reward"] for p in pairs] + [p["rejected_reward"] for p in pairs]),
                          expected, atol=ATOL)

    scorer = load_reward_scorer(str(trained["out"]), max_length=1024, batch_size=16)  # base from adapter_config
    chosen, rejected = scorer.score_pairs(records)
    assert torch.allclose(torch.cat([chosen, rejected]), expected, atol=ATOL)

    adapter = load_reward_model(str(trained["out"]), base=str(trained["model"]))
    with adapter.disable_adapter():  # what the merged comparison must tell apart: the base without adapter and head
        base_scores = torch.cat(RewardScorer(adapter, scorer.tokenizer, scorer.chat_format).score_pairs(records))
    assert (base_scores - expected).abs().max() > 100 * MERGE_ATOL
    merged_dir = tmp_path / "merged"
    adapter.merge_and_unload().save_pretrained(merged_dir)
    scorer.tokenizer.save_pretrained(merged_dir)
    merged = load_reward_model(str(merged_dir))
    assert type(merged).__name__ == "LlamaForSequenceClassification" and merged.config.num_labels == 1
    chosen, rejected = RewardScorer(merged, scorer.tokenizer, scorer.chat_format).score_pairs(records)
    assert torch.allclose(torch.cat([chosen, rejected]), expected, atol=MERGE_ATOL)


def test_left_and_right_padding_give_the_same_scores(trained, tmp_path):
    scorer = load_reward_scorer(str(trained["out"]))
    records = held_out_records(trained, tmp_path)[:12]
    ids = [s for r in records for s in scorer.pair_ids(r)]
    assert len({len(s) for s in ids}) > 4  # really different lengths, so batches are padded
    one_by_one = torch.cat([scorer.score_ids([s]) for s in ids])
    for side in ("left", "right"):
        batched = RewardScorer(scorer.model, scorer.tokenizer, scorer.chat_format, batch_size=5, padding_side=side)
        assert torch.allclose(batched.score_ids(ids), one_by_one, atol=ATOL), side
    conversation = records[0]["messages"] + [{"role": "assistant", "content": records[0]["chosen"]}]
    assert scorer.conversation_ids(conversation) == ids[0]
    assert scorer.score_conversations([conversation]).tolist() == pytest.approx([one_by_one[0].item()], abs=ATOL)


def test_trainer_loss_subtracts_each_pairs_margin(trained, tmp_path):
    trainer = trained["trainer"]
    rows = [dict(r, margin=m) for r, m in zip(trained["held_out"][:3], (0.0, 1.0, 2.5))]
    records = load_preferences([str(write_jsonl(tmp_path / "margins.jsonl", rows))])
    assert [r["margin"] for r in records] == [0.0, 1.0, 2.5]
    tokenizer, fmt = tiny_chat(trained["out"])
    batch = trainer.data_collator(pair_rows(encode_pairs(records, tokenizer, fmt, max_length=512)))
    assert batch["margin"].tolist() == [0.0, 1.0, 2.5] and batch["input_ids"].shape[0] == 6
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    trainer._metrics["eval"].clear()
    chosen, rejected = RewardScorer(trainer.model, tokenizer, fmt).score_pairs(records)
    by_hand = sum(math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(chosen.tolist(), rejected.tolist(),
                                                                        (0.0, 1.0, 2.5))) / 3
    assert loss == pytest.approx(by_hand, abs=1e-5)
    assert loss > pairwise_loss(chosen, rejected).item()  # a margin asks for a wider gap


def test_score_rewards_script_reproduces_the_training_predictions(trained, tmp_path, capsys):
    import score_rewards

    output = tmp_path / "scores.jsonl"
    args = ["--model", str(trained["out"]), "--data_file", str(trained["predict"]), "--output_file", str(output),
            "--batch_size", "7"]
    metrics = score_rewards.main(args)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    expected = predictions(trained["out"])
    assert [r["source"] for r in rows] == [r["source"] for r in expected]
    for got, want in zip(rows, expected):
        for key in ("reward", "chosen_reward", "rejected_reward"):
            assert (key in got) == (key in want) and got.get(key, 0.0) == pytest.approx(want.get(key, 0.0), abs=ATOL)
    assert metrics["accuracy"] == float(read_results(trained["out"] / "predict_results.txt")["predict_accuracy"])
    # an existing output file is kept unless --overwrite_output_file
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: score_rewards.main(args))
    assert exit_info.value.code == 2
    assert f"error: --output_file {output} exists: choose another or pass --overwrite_output_file." in \
        capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Full training and QLoRA (in-process)


def test_full_training_saves_a_reward_model_that_reloads_exactly(tiny_chat_model_dir, tmp_path):
    write_jsonl(tmp_path / "train" / "pairs.jsonl", synthetic_pairs(16, seed=3))
    write_jsonl(tmp_path / "predict.jsonl", synthetic_pairs(6, seed=4))
    out = tmp_path / "full"
    trainer = run_rm(*rm_args(tiny_chat_model_dir, tmp_path / "train", out, "--use_peft", "False", "--max_steps", "2",
                              "--report_to", "none", "--do_predict", "--predict_file", str(tmp_path / "predict.jsonl")))
    assert trainer.state.global_step == 2
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    assert not (out / "adapter_config.json").exists()
    rows = predictions(out)
    expected = torch.tensor([r["chosen_reward"] for r in rows] + [r["rejected_reward"] for r in rows])
    scorer = load_reward_scorer(str(out))
    chosen, rejected = scorer.score_pairs(load_preferences([str(tmp_path / "predict.jsonl")]))
    assert torch.allclose(torch.cat([chosen, rejected]), expected, atol=ATOL)


def test_qlora_trains_on_cpu(tiny_chat_model_dir, tmp_path):
    write_jsonl(tmp_path / "train" / "pairs.jsonl", synthetic_pairs(16, seed=5))
    trainer = run_rm(*rm_args(tiny_chat_model_dir, tmp_path / "train", tmp_path / "q", "--load_in_4bit", "--qlora",
                              "--max_steps", "2", "--report_to", "none", "--logging_steps", "1"))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    head = trainer.model.base_model.model.score.modules_to_save["default"].weight
    assert head.dtype == torch.float32 and head.requires_grad


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one clear error (file:line), exit 2, no traceback, an existing output_dir untouched

BAD_RECORDS = {
    "identical": ({"prompt": "q", "chosen": "same", "rejected": "same "},
                  "bad.jsonl:2: rejected: chosen and rejected are identical: the pair carries no preference"),
    "missing": ({"conversations": [{"from": "human", "value": "q"}], "chosen": "a"},
                "bad.jsonl:2: rejected: missing 'rejected'"),
    "empty_prompt": ({"question": "  ", "response_chosen": "a", "response_rejected": "b"},
                     "bad.jsonl:2: question: empty text"),
    "not_a_string": ({"prompt": "q", "chosen": 5, "rejected": "b"}, "bad.jsonl:2: chosen: expected a string, got int"),
    "unknown_format": ({"input": "q", "output": "a"},
                       "bad.jsonl:1: unknown preference format with keys ['input', 'output']"),
}


def bad_data(tmp_path: Path, case: str) -> Path:
    record, _ = BAD_RECORDS[case]
    good = {"question": "q", "response_chosen": "a", "response_rejected": "b"} if "question" in record else \
        {"prompt": "q", "chosen": "a", "rejected": "b"} if "prompt" in record else \
        {"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": "b"}
    rows = [record] if case == "unknown_format" else [good, record]
    return write_jsonl(tmp_path / "bad" / "bad.jsonl", rows).parent


def untouched_output_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out


def run_rm_expecting_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: run_rm(*args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_training_data_is_one_clear_error(tiny_chat_model_dir, tmp_path, capsys, case):
    out = untouched_output_dir(tmp_path)
    err = run_rm_expecting_error(capsys, *rm_args(tiny_chat_model_dir, bad_data(tmp_path, case), out,
                                                  "--overwrite_output_dir"))
    assert re.search(r"^error: \S*" + re.escape(BAD_RECORDS[case][1]), err, re.M), err
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_bad_predict_file_fails_before_training(tiny_chat_model_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "train" / "pairs.jsonl", synthetic_pairs(4, seed=6))
    predict = write_jsonl(tmp_path / "predict.jsonl", [{"conversations": [{"from": "human", "value": "q"}]}])
    out = untouched_output_dir(tmp_path)
    err = run_rm_expecting_error(capsys, *rm_args(tiny_chat_model_dir, tmp_path / "train", out, "--overwrite_output_dir",
                                                  "--do_predict", "--predict_file", str(predict)))
    assert f"error: {predict}:1: conversations: conversation must end with an assistant turn" in err
    assert sorted(os.listdir(out)) == ["keep.txt"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--qlora"], "--qlora needs --load_in_4bit"),
        (["--do_predict"], "--do_predict needs --predict_file FILE"),
        (["--predict_file", "x.jsonl"], "--predict_file is only read with --do_predict"),
        (["--do_predict", "--predict_file", "MISSING"], "MISSING: no such file or directory"),
        (["--load_in_4bit", "--use_peft", "False"], "train through LoRA only"),
        (["--model_name_or_path", "ADAPTER"], "is a LoRA adapter, not a model: merge it into its base model first"),
    ],
)
def test_bad_flags_are_one_clear_error(tiny_chat_model_dir, tmp_path, capsys, extra, message):
    write_jsonl(tmp_path / "train" / "pairs.jsonl", synthetic_pairs(4, seed=6))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    extra = [str(adapter) if e == "ADAPTER" else str(tmp_path / "MISSING") if e == "MISSING" else e for e in extra]
    message = message.replace("MISSING", str(tmp_path / "MISSING"))
    out = untouched_output_dir(tmp_path)
    err = run_rm_expecting_error(capsys, *rm_args(tiny_chat_model_dir, tmp_path / "train", out, "--overwrite_output_dir",
                                                  *extra))
    assert message in err, err
    assert sorted(os.listdir(out)) == ["keep.txt"]


def test_bad_input_through_the_real_script_has_no_traceback(tiny_chat_model_dir, tmp_path):
    out = untouched_output_dir(tmp_path)
    proc = run_script("reward_modeling.py", *rm_args(tiny_chat_model_dir, bad_data(tmp_path, "identical"), out,
                                                     "--overwrite_output_dir"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {tmp_path / 'bad' / BAD_RECORDS['identical'][1]}" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_not_a_reward_model_is_a_clear_error(tiny_chat_model_dir, tmp_path):
    from medtrain.errors import UserError

    with pytest.raises(UserError, match="is not a reward model"):
        load_reward_model(str(tiny_chat_model_dir))  # a causal LM: loading it would invent a random head
    sft_adapter = tmp_path / "sft-adapter"
    sft_adapter.mkdir()
    (sft_adapter / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM"}))
    with pytest.raises(UserError, match="this adapter was trained for CAUSAL_LM, not as a reward model"):
        load_reward_model(str(sft_adapter), base=str(tiny_chat_model_dir))


# ----------------------------------------------------------------------------------------------------------------
# The real model on real pairs (slow)


@pytest.mark.slow
@requires_shared
def test_smollm2_on_medical_pairs_reports_held_out_accuracy(tmp_path):
    """A short real run (about 40 min on a busy 2-core CPU): 400 pairs to train, 100 held out, max length 256.

    Most dpo_zh_500 replies are longer than 255 SmolLM2 tokens, so only 87 training and 18 held-out pairs fit
    (the rest are dropped and counted). 22 LoRA steps do not move held-out accuracy beyond the noise of 18 pairs
    (one pair = 0.056), so this checks the pipeline and reports the numbers (-s) rather than asserting a gain.
    """
    model = ROOT / "models" / "SmolLM2-135M-Instruct"
    data = shared_path("data", "medical-zh", "reward", "dpo_zh_500.jsonl")
    if not (model / "config.json").is_file() or not data.is_file():
        pytest.skip("models/SmolLM2-135M-Instruct (python prepare_model.py) or dpo_zh_500.jsonl is absent")
    lines = data.read_text(encoding="utf-8").splitlines()
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    (tmp_path / "train" / "pairs.jsonl").write_text("\n".join(lines[:400]) + "\n", encoding="utf-8")
    (tmp_path / "val" / "pairs.jsonl").write_text("\n".join(lines[400:500]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = run_script("reward_modeling.py", *rm_args(
        model, tmp_path / "train", out, "--validation_file_dir", str(tmp_path / "val"), "--model_max_length", "256",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--learning_rate", "2e-4", "--eval_strategy", "epoch", "--eval_on_start", "True"), timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "train: 387 of 400 preference pairs longer than 256 tokens: 74 prompt(s) truncated from the left, " \
           "313 pair(s) dropped" in log
    assert "eval: 96 of 100 preference pairs longer than 256 tokens: 14 prompt(s) truncated from the left, " \
           "82 pair(s) dropped" in log
    evals = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "eval_accuracy" in e]
    assert [e["step"] for e in evals] == [0, 22]  # before training, after the epoch (ceil(87 / 4) steps)
    before, after = evals[0]["eval_accuracy"], evals[-1]["eval_accuracy"]
    # accuracies are whole pairs out of 18
    assert all(abs(a * 18 - round(a * 18)) < 1e-9 for a in (before, after))
    print(f"held-out pairwise accuracy on 18 pairs: before {before:.3f}, after {after:.3f}")
