"""DPO on tiny models: the exact pair layout TRL trains on, the reference model per mode, learning a synthetic
preference, metrics in every output, and clear errors for unknown or conflicting flags and bad data."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

from conftest import (ROOT, build_model, build_tokenizer, requires_shared, run_script, shared_path,
                      write_jsonl)
from medtrain.chat_format import get_chat_format
from medtrain.dpo import LOSS_TYPES, encode_preference_dataset
from medtrain.entrypoint import run_main
from medtrain.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_dpo(*args: str):
    import dpo_training

    return dpo_training.main([str(a) for a in args])


def quiet_args(model_dir, data, out, *extra) -> list[str]:
    return ["--model_name_or_path", model_dir, "--train_file_dir", data, "--output_dir", out, "--seed", "0",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", *extra]


# ----------------------------------------------------------------------------------------------------------------
# Data shared by the runs below

MULTI_TURN = {
    "conversations": [
        {"from": "system", "value": "You are a doctor."},
        {"from": "human", "value": "Hello."},
        {"from": "gpt", "value": "Hi, how can I help?"},
        {"from": "human", "value": "I have a fever."},
    ],
    "chosen": "Drink water.",
    "rejected": "Take salt.",
}
# The ChatML text of MULTI_TURN, cut where the ids are concatenated: at special tokens (tokenized alone) and at the
# boundary between a history prompt and its answer (SFT tokenizes those separately too).
PROMPT_SEGMENTS = [
    "<|im_start|>", "system\nYou are a doctor.", "<|im_end|>", "\n",
    "<|im_start|>", "user\nHello.", "<|im_end|>", "\n",
    "<|im_start|>", "assistant\n", "Hi, how can I help?", "<|im_end|>", "\n",
    "<|im_start|>", "user\nI have a fever.", "<|im_end|>", "\n",
    "<|im_start|>", "assistant\n",
]
CHOSEN_SEGMENTS = ["Drink water.", "<|im_end|>"]
REJECTED_SEGMENTS = ["Take salt.", "<|im_end|>"]
MAX_LENGTH = 96
LONG_SYSTEM = "You are a doctor. " * 8  # the prompt alone exceeds MAX_LENGTH: truncated from the left
LONG_REPLY = "Drink water and rest. " * 8  # one reply exceeds MAX_LENGTH: the pair is dropped


def simple_pair(question: str, chosen: str, rejected: str) -> dict:
    return {"conversations": [{"from": "human", "value": question}], "chosen": chosen, "rejected": rejected}


TRAIN_ROWS = [
    MULTI_TURN,
    simple_pair("I have a cough.", "Rest and drink water.", "Skip the doctor."),
    {"conversations": [{"from": "system", "value": LONG_SYSTEM}, {"from": "human", "value": "I have a fever."}],
     "chosen": "See a doctor.", "rejected": "Ignore it."},
    simple_pair("I have a cold.", LONG_REPLY, "Ignore it."),
    simple_pair("I have diabetes.", "Check glucose often.", "Eat more sugar."),
]
EVAL_ROWS = [simple_pair("I have a fever.", "Drink water.", "Take salt."),
             simple_pair("I have hypertension.", "Reduce salt.", "Eat more salt.")]


def encode(tokenizer, segments: list[str]) -> list[int]:
    return [i for segment in segments for i in tokenizer.encode(segment, add_special_tokens=False)]


# ----------------------------------------------------------------------------------------------------------------
# Exact token layout


def test_multi_turn_pair_layout_with_system_prompt(tiny_chat_model_dir):
    from transformers import AutoTokenizer

    from medtrain.formats import load_preferences

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    chat_format = get_chat_format(tokenizer, None)
    path = write_jsonl(Path(tiny_chat_model_dir).parent / "layout" / "pair.jsonl", [MULTI_TURN])
    dataset = encode_preference_dataset(load_preferences([str(path)]), tokenizer, chat_format, MAX_LENGTH, "left", "train")

    assert dataset.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    pair = dataset[0]
    assert pair["prompt_ids"] == encode(tokenizer, PROMPT_SEGMENTS)
    assert pair["chosen_ids"] == encode(tokenizer, CHOSEN_SEGMENTS)
    assert pair["rejected_ids"] == encode(tokenizer, REJECTED_SEGMENTS)
    assert tokenizer.decode(pair["prompt_ids"]) == "".join(PROMPT_SEGMENTS)
    # The end-of-turn token closes each reply and is trained; the newline ChatML prints after it belongs to the
    # next prompt, never to a reply.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert pair["chosen_ids"][-1] == im_end and pair["rejected_ids"][-1] == im_end
    assert [i for i, t in enumerate(pair["prompt_ids"]) if t == im_end] == [18, 28, 49, 66]


def test_truncation_left_and_drop_are_counted(tiny_chat_model_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    from medtrain.formats import load_preferences

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    chat_format = get_chat_format(tokenizer, None)
    records = load_preferences([str(write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS))])
    with caplog.at_level("WARNING"):
        left = encode_preference_dataset(records, tokenizer, chat_format, MAX_LENGTH, "left", "train")
        drop = encode_preference_dataset(records, tokenizer, chat_format, MAX_LENGTH, "drop", "train")
    assert len(left) == 4 and len(drop) == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "medtrain.preference"]
    assert messages == [
        "train: 2 of 5 preference pairs longer than 96 tokens: 1 prompt(s) truncated from the left, 1 pair(s) dropped",
        "train: to keep the 1 dropped pair(s): pass --truncation reply (cut the replies at their end instead) or "
        "raise --model_max_length",
        "train: 2 of 5 preference pairs longer than 96 tokens: 0 prompt(s) truncated from the left, 2 pair(s) dropped",
        "train: to keep the 2 dropped pair(s): pass --truncation reply (cut the replies at their end instead) or "
        "raise --model_max_length",
    ]
    # The truncated pair fills MAX_LENGTH exactly and keeps the end of its prompt (the assistant header).
    cut = left[2]
    assert len(cut["prompt_ids"]) + max(len(cut["chosen_ids"]), len(cut["rejected_ids"])) == MAX_LENGTH
    assert tokenizer.decode(cut["prompt_ids"]).endswith("I have a fever.<|im_end|>\n<|im_start|>assistant\n")


def test_truncation_reply_keeps_every_pair_with_half_the_length_for_the_prompt(tiny_chat_model_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    from medtrain.formats import load_preferences

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    chat_format = get_chat_format(tokenizer, None)
    records = load_preferences([str(write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS))])
    whole = encode_preference_dataset(records, tokenizer, chat_format, 10_000, "drop", "train")
    with caplog.at_level("WARNING"):
        reply = encode_preference_dataset(records, tokenizer, chat_format, MAX_LENGTH, "reply", "train")
    assert [r.getMessage() for r in caplog.records if r.name == "medtrain.preference"] == [
        "train: 2 of 5 preference pairs longer than 96 tokens: cut to fit (prompt from the left, replies at the end)"]
    assert len(reply) == 5
    for full, cut in zip(whole, reply):
        assert total_length(cut) <= MAX_LENGTH
        assert full["prompt_ids"][len(full["prompt_ids"]) - len(cut["prompt_ids"]):] == cut["prompt_ids"]
        assert full["chosen_ids"][: len(cut["chosen_ids"])] == cut["chosen_ids"]
        assert full["rejected_ids"][: len(cut["rejected_ids"])] == cut["rejected_ids"]
    assert whole[0] == reply[0] and whole[1] == reply[1] and whole[4] == reply[4]  # pairs that fit are untouched
    # long prompt, short replies: the prompt keeps all the room the replies leave (as with "left")
    assert reply[2]["chosen_ids"] == whole[2]["chosen_ids"] and total_length(reply[2]) == MAX_LENGTH
    # long reply: the prompt stays whole (it is shorter than half), the long reply is cut at its end to the rest
    assert reply[3]["prompt_ids"] == whole[3]["prompt_ids"] and reply[3]["rejected_ids"] == whole[3]["rejected_ids"]
    assert len(reply[3]["chosen_ids"]) == MAX_LENGTH - len(whole[3]["prompt_ids"]) < len(whole[3]["chosen_ids"])


def total_length(pair: dict) -> int:
    return len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))


# ----------------------------------------------------------------------------------------------------------------
# A LoRA run: the reference is the base with the adapter disabled; TRL trains on our ids uncut; metrics everywhere


@pytest.fixture(scope="module")
def lora_run(tiny_chat_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-lora")
    write_jsonl(root / "train" / "pairs.jsonl", TRAIN_ROWS)
    write_jsonl(root / "eval" / "pairs.jsonl", EVAL_ROWS)
    out = root / "out"
    trainer = run_dpo(
        "--model_name_or_path", tiny_chat_model_dir, "--train_file_dir", root / "train",
        "--validation_file_dir", root / "eval", "--output_dir", out, "--model_max_length", MAX_LENGTH,
        "--per_device_train_batch_size", 2, "--per_device_eval_batch_size", 2, "--max_steps", 2,
        "--logging_steps", 1, "--learning_rate", 1e-2, "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "True",
    )
    return trainer, out


def test_lora_reference_is_the_base_without_a_copy(lora_run, tiny_chat_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, _ = lora_run
    assert isinstance(trainer.model, PeftModel)
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]  # TRL's "ref" adapter copy was removed
    # A fresh adapter starts as the identity, so the policy equals the reference at the first step.
    first = trainer.state.log_history[0]
    assert first["rewards/margins"] == 0.0 and first["rewards/chosen"] == 0.0
    # With the adapter disabled the model is exactly the base checkpoint.
    batch = trainer.data_collator([trainer.train_dataset[0]])
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval()
    model = trainer.model.eval()
    with torch.no_grad(), model.disable_adapter():
        disabled = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(disabled, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (trained - expected).abs().max() > 1e-3  # the adapter did learn something


def test_trl_trains_on_our_ids_without_recutting(lora_run, tiny_chat_model_dir):
    from transformers import AutoTokenizer

    trainer, _ = lora_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    assert trainer.shared_prompt  # CPU run: our shared-prompt rows, around TRL's own padded collator
    assert trainer.args.max_length == MAX_LENGTH and trainer.data_collator.padded.max_length == MAX_LENGTH
    assert len(trainer.train_dataset) == 5  # default --truncation reply: every pair kept (one prompt cut, one reply)
    first = trainer.train_dataset[0]
    assert first["prompt_ids"] == encode(tokenizer, PROMPT_SEGMENTS)  # not re-tokenized by TRL
    prompt, chosen, rejected = (encode(tokenizer, s) for s in (PROMPT_SEGMENTS, CHOSEN_SEGMENTS, REJECTED_SEGMENTS))
    batch = trainer.data_collator([first, trainer.train_dataset[2]])
    # Rows: chosen of each pair, then rejected of each pair, right-padded to the longest (the truncated pair).
    assert batch["input_ids"].shape == (4, MAX_LENGTH)
    assert batch["input_ids"][0, : len(prompt) + len(chosen)].tolist() == prompt + chosen
    assert batch["completion_mask"][0].tolist() == [0] * len(prompt) + [1] * len(chosen) + [0] * (MAX_LENGTH - 80)
    assert batch["input_ids"][2, : len(prompt) + len(rejected)].tolist() == prompt + rejected
    # The pair that fills MAX_LENGTH comes through whole: its reply still ends with the end-of-turn token.
    cut = trainer.train_dataset[2]
    row, longest = (1, cut["chosen_ids"]) if len(cut["chosen_ids"]) >= len(cut["rejected_ids"]) else (3, cut["rejected_ids"])
    assert batch["input_ids"][row].tolist() == cut["prompt_ids"] + longest
    assert int(batch["attention_mask"][row].sum()) == MAX_LENGTH


def test_metrics_in_logs_results_and_tensorboard(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, out = lora_run
    keys = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"]
    assert all(key in trainer.state.log_history[0] for key in keys)
    eval_json = json.loads((out / "eval_results.json").read_text())
    assert all(f"eval_{key}" in eval_json for key in keys) and eval_json["eval_samples"] == 2
    lines = (out / "eval_results.txt").read_text().splitlines()
    for key in keys:
        assert f"eval_{key} = {eval_json[f'eval_{key}']}" in lines
    assert (out / "train_results.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "ref").exists()
    events = EventAccumulator(str(out / "logs")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{key}" for key in keys} <= tags and {f"eval/{key}" for key in keys} <= tags


# ----------------------------------------------------------------------------------------------------------------
# Full training: a frozen reference copy, and a synthetic preference learned on held-out pairs

GOOD = ["drink water", "rest", "see a doctor", "check glucose", "follow the diet plan", "take medicine as prescribed",
        "reduce salt", "exercise"]
BAD = ["skip the doctor", "ignore the fever", "double the dose", "stop the medicine", "eat more salt", "never rest"]
TOPICS = ["a fever", "a cough", "high blood pressure", "diabetes", "high blood sugar", "a headache", "a cold"]


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Chosen replies combine careful advice, rejected ones careless advice; held-out pairs are new combinations."""
    rng = random.Random(seed)
    return [simple_pair(f"I have {rng.choice(TOPICS)}. What should I do?",
                        ", ".join(rng.sample(GOOD, 2)).capitalize() + ".",
                        ", ".join(rng.sample(BAD, 2)).capitalize() + ".") for _ in range(n)]


@pytest.fixture(scope="module")
def full_run(tiny_chat_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-full")
    write_jsonl(root / "train" / "pairs.jsonl", synthetic_pairs(48, seed=1))
    write_jsonl(root / "eval" / "pairs.jsonl", synthetic_pairs(24, seed=2))
    trainer = run_dpo(*quiet_args(
        tiny_chat_model_dir, root / "train", root / "out", "--validation_file_dir", root / "eval",
        "--use_peft", "False", "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 24,
        "--learning_rate", 1e-3, "--lr_scheduler_type", "constant", "--max_steps", 12, "--eval_strategy", "steps",
        "--eval_steps", 6, "--logging_steps", 6,
    ))
    return trainer


def test_full_training_keeps_a_frozen_reference(full_run, tiny_chat_model_dir):
    from transformers import AutoModelForCausalLM

    trainer = full_run
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    start = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).state_dict()
    ref = trainer.ref_model.state_dict()
    policy = trainer.model.state_dict()
    assert all(torch.equal(ref[name], start[name]) for name in start)
    assert any(not torch.equal(policy[name], start[name]) for name in start)


def test_synthetic_preference_is_learned_on_held_out_pairs(full_run):
    evals = [h for h in full_run.state.log_history if "eval_rewards/accuracies" in h]
    assert [h["step"] for h in evals] == [6, 12]
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    margins = [h["eval_rewards/margins"] for h in evals]
    assert 0 < margins[0] < margins[1]
    train_margins = [h["rewards/margins"] for h in full_run.state.log_history if "rewards/margins" in h]
    assert len(train_margins) == 2 and 0 < train_margins[0] < train_margins[1]
    # The evaluation at the last step is written as the final result, not run a second time.
    results = json.loads((Path(full_run.args.output_dir) / "eval_results.json").read_text())
    assert results["eval_rewards/margins"] == margins[-1] and results["eval_samples"] == 24


def test_precomputed_reference_keeps_no_model(tiny_chat_model_dir, tmp_path):
    write_jsonl(tmp_path / "train" / "pairs.jsonl", synthetic_pairs(4, seed=3))
    trainer = run_dpo(*quiet_args(
        tiny_chat_model_dir, tmp_path / "train", tmp_path / "out", "--use_peft", "False",
        "--precompute_ref_log_probs", "True", "--per_device_train_batch_size", 4, "--max_steps", 1,
        "--logging_steps", 1, "--do_eval", "False",
    ))
    assert trainer.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
    # Reference log-probs came from the starting policy: at the first step the implicit rewards are zero.
    assert abs(trainer.state.log_history[0]["rewards/margins"]) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Flags and errors


def test_every_dpo_config_option_is_a_flag(capsys):
    from trl import DPOConfig

    with pytest.raises(SystemExit) as exit_info:
        run_dpo("--help")
    assert exit_info.value.code == 0
    flags = set(re.findall(r"--(\w+)", capsys.readouterr().out))
    expected = {f.name for f in dataclasses.fields(DPOConfig) if f.init} | {"ref_model_name_or_path", "truncation"}
    assert expected - flags == set()


def test_loss_types_match_trl():
    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    assert sorted(LOSS_TYPES) == sorted(set(re.findall(r'loss_type == "(\w+)"', source)))


CONFLICTS = {
    "sync_with_lora": (["--sync_ref_model", "True"], "--sync_ref_model needs full training (--use_peft False)"),
    "sync_with_precompute": (["--use_peft", "False", "--sync_ref_model", "True", "--precompute_ref_log_probs", "True"],
                             "--sync_ref_model and --precompute_ref_log_probs exclude each other"),
    "exo_without_smoothing": (["--loss_type", "exo_pair"], "--loss_type exo_pair needs 0 < --label_smoothing < 1"),
    "smoothing_ignored": (["--label_smoothing", "0.1"],
                          "--label_smoothing has no effect with --loss_type sigmoid"),
    "unknown_loss": (["--loss_type", "dpo"], "--loss_type dpo: unknown; choose from sigmoid, hinge, ipo"),
    "f_divergence_loss": (["--f_divergence_type", "js_divergence", "--loss_type", "bco_pair"],
                          "--f_divergence_type js_divergence works only with --loss_type in"),
    "mixup_without_sync": (["--ref_model_mixup_alpha", "0.9"], "--ref_model_mixup_alpha is used only with --sync_ref_model."),
    "batch_without_precompute": (["--precompute_ref_batch_size", "8"],
                                 "--precompute_ref_batch_size is used only with --precompute_ref_log_probs."),
    "max_length_mismatch": (["--max_length", "64"], "--max_length 64 differs from --model_max_length 1024"),
    "keep_end": (["--truncation_mode", "keep_end"], "--truncation_mode keep_end has no effect"),
    "weighting_aot": (["--use_weighting", "True", "--loss_type", "aot"], "--use_weighting cannot be combined with aot"),
    "loss_weights_length": (["--loss_type", "sigmoid", "sft", "--loss_weights", "1"],
                            "`loss_weights` must have the same length as `loss_type`"),
}


@pytest.mark.parametrize("name", sorted(CONFLICTS))
def test_conflicting_flags_are_refused(name, tiny_chat_model_dir, tmp_path):
    flags, message = CONFLICTS[name]
    with pytest.raises(ConfigError) as err:
        run_dpo(*quiet_args(tiny_chat_model_dir, tmp_path, tmp_path / "out", *flags))
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_all_conflicts_reported_at_once(tiny_chat_model_dir, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_dpo(*quiet_args(tiny_chat_model_dir, tmp_path, tmp_path / "out", "--sync_ref_model", "True",
                            "--label_smoothing", "0.1"))
    assert len(err.value.problems) == 2


def test_reference_path_equal_to_the_lora_base_is_refused(tiny_chat_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--ref_model_name_or_path is the base model itself"):
        run_dpo(*quiet_args(tiny_chat_model_dir, tmp_path, tmp_path / "out",
                            "--ref_model_name_or_path", tiny_chat_model_dir))


def test_reference_with_another_tokenizer_is_refused(tiny_chat_model_dir, tmp_path):
    other = tmp_path / "other"
    build_model(other, build_tokenizer(other, vocab_size=300))
    write_jsonl(tmp_path / "train" / "pairs.jsonl", EVAL_ROWS)
    with pytest.raises(ConfigError, match="its tokenizer differs from the policy's"):
        run_dpo(*quiet_args(tiny_chat_model_dir, tmp_path / "train", tmp_path / "out", "--use_peft", "False",
                            "--ref_model_name_or_path", other))


def test_unknown_flag_exits_2_naming_it(tiny_chat_model_dir, tmp_path):
    result = run_script("dpo_training.py", "--model_name_or_path", str(tiny_chat_model_dir),
                        "--train_file_dir", str(tmp_path), "--betta", "0.2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown flag(s) --betta 0.2. Check the spelling: `--help` lists every flag."
    )
    assert "Traceback" not in result.stderr


def test_bad_record_names_file_line_and_field(tiny_chat_model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "train" / "pairs.jsonl",
                       [EVAL_ROWS[0], {"conversations": [{"from": "human", "value": "Hi."}], "chosen": "Hello."}])
    args = quiet_args(tiny_chat_model_dir, tmp_path / "train", tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: run_dpo(*args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # the record's location leads; the rest says why the run stopped (1 bad of 2 is a format problem) and the flags
    assert err.splitlines()[0] == f"error: {path}:2: rejected: missing 'rejected'"
    assert "--max_invalid_fraction" in err and "--skip_invalid_samples" in err


# ----------------------------------------------------------------------------------------------------------------
# The real model on real preference data (slow)

SMOL = ROOT / "models" / "SmolLM2-135M-Instruct"
DPO_ZH = shared_path("data", "medical-zh", "reward", "dpo_zh_500.jsonl")


def policy_preference(trainer, dataset) -> tuple[float, float]:
    """Held-out accuracy and mean of the policy's own per-token log-prob gap, chosen minus rejected.

    Unlike the implicit reward (zero before training by definition), this shows how the model ranks the replies.
    """
    model = trainer.model.eval()
    gaps = []
    with torch.no_grad():
        for example in dataset:
            batch = trainer.data_collator([example])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            logps = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
            mask = batch["completion_mask"][:, 1:].float()
            per_token = (logps * mask).sum(1) / mask.sum(1)
            gaps.append(float(per_token[0] - per_token[1]))
    return sum(g > 0 for g in gaps) / len(gaps), sum(gaps) / len(gaps)


@pytest.mark.slow
@requires_shared
@pytest.mark.skipif(not (SMOL / "config.json").is_file(), reason="models/SmolLM2-135M-Instruct absent (prepare_model.py)")
@pytest.mark.skipif(not DPO_ZH.is_file(), reason="dpo_zh_500.jsonl absent from ../shared")
def test_smollm2_dpo_on_real_pairs(tmp_path, capsys):
    """200 pairs in, 50 held-out pairs from the end of the file; prints held-out accuracy and margin before/after."""
    rows = DPO_ZH.read_text(encoding="utf-8").splitlines()
    write = lambda path, lines: (path.parent.mkdir(), path.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    write(tmp_path / "train" / "pairs.jsonl", rows[:200])
    write(tmp_path / "eval" / "pairs.jsonl", rows[-50:])
    # SmolLM2's tokenizer spends ~1,000 tokens on a median pair of this Chinese data; 192 tokens keep the run to
    # minutes on 2 cores. --truncation reply keeps every pair: the end of the prompt and the start of both replies.
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the module runs tiny models on one thread; this one is real
    try:
        trainer = run_dpo(*quiet_args(
            SMOL, tmp_path / "train", tmp_path / "out", "--validation_file_dir", tmp_path / "eval",
            "--model_max_length", 192, "--truncation", "reply", "--per_device_train_batch_size", 4,
            "--per_device_eval_batch_size", 8, "--num_train_epochs", 1, "--learning_rate", 2e-4, "--beta", 0.1,
            "--logging_steps", 10, "--do_train", "False", "--do_eval", "False",
        ))
        assert (len(trainer.train_dataset), len(trainer.eval_dataset)) == (200, 50)  # nothing dropped
        before = trainer.evaluate()
        before_policy = policy_preference(trainer, trainer.eval_dataset)
        trainer.train()
        after = trainer.evaluate()
        after_policy = policy_preference(trainer, trainer.eval_dataset)
    finally:
        torch.set_num_threads(threads)
    logged = [e for e in trainer.state.log_history if "rewards/accuracies" in e]
    report = {
        "held_out_implicit_reward_accuracy": [before["eval_rewards/accuracies"], after["eval_rewards/accuracies"]],
        "held_out_implicit_reward_margin": [before["eval_rewards/margins"], after["eval_rewards/margins"]],
        "held_out_policy_logp_gap_accuracy": [before_policy[0], after_policy[0]],
        "held_out_policy_logp_gap_mean": [before_policy[1], after_policy[1]],
        "train_accuracy_margin_per_10_steps": [(round(e["rewards/accuracies"], 3), round(e["rewards/margins"], 3))
                                               for e in logged],
    }
    with capsys.disabled():
        print("\nSmolLM2 DPO [before, after]:", json.dumps(report))
    assert before["eval_rewards/margins"] == 0.0  # a fresh adapter is the reference
    assert len(logged) == 5  # 50 steps, logged every 10
    # The trained preference rises over the epoch; the held-out numbers are reported (not asserted: 50 pairs).
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]
