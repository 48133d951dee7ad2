"""DPO's shared-prompt rows (medtrain/shared_prompt.py): the exact packed layout, the same log-probs, metrics and
gradients as TRL's padded rows, a start-up check that catches a model whose attention ignores the layout, and the
same training run either way."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

import medtrain.attention
from conftest import write_jsonl
from medtrain.shared_prompt import (PAIR_KEYS, SharedPromptCollator, add_shared_prompt_forward, pack_pairs,
                                    shared_prompt_mismatch, use_segment_attention)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def test_packed_row_layout_token_by_token():
    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12]}]
    packed = pack_pairs(examples, width=5)  # padded rows: 1 2 3 4 5 / 7 8 9 . . / 1 2 3 6 . / 7 8 10 11 12
    assert packed["pair_input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6, 7, 8, 9, 8, 10, 11, 12]]
    # each token at its position in its own padded row; the rejected copy of the prompt's last token at its position
    assert packed["pair_position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 3, 4]]
    # only reply tokens are predicted, each by the token before it in its own row
    assert packed["pair_shift_labels"].tolist() == [[-100, -100, 4, 5, -100, 6, -100, -100, 9, -100, 10, 11, 12, -100]]
    # where each prediction lands in the (4 rows, 4 columns) log-prob layout of the padded batch, flattened
    assert packed["pair_index"].tolist() == [0 * 4 + 2, 0 * 4 + 3, 2 * 4 + 2, 1 * 4 + 1, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3]
    # (start, end, prefix start, prefix length): each rejected segment sees its prompt minus the copied last token
    assert packed["pair_segments"].tolist() == [[0, 5, 0, 0], [5, 7, 0, 2], [7, 10, 7, 0], [10, 14, 7, 1]]


def test_pairs_wider_than_the_padded_rows_are_refused():
    with pytest.raises(ValueError, match="wider than the padded batch"):
        pack_pairs([{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]}], width=4)


def context_sensitive_model(seed: int = 0, vocab: int = 50) -> LlamaForCausalLM:
    """A tiny Llama with large weights, so that every token's log-prob depends strongly on what it attends to."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    add_fused_lm_head(model, outputs=OUTPUTS)
    return model


def random_pairs(n: int, seed: int, vocab: int = 50) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": ids(1, 9), "chosen_ids": ids(1, 8), "rejected_ids": ids(1, 8)} for _ in range(n)]


def padded_and_packed(model, examples):
    collator = SharedPromptCollator(DataCollatorForPreference(pad_token_id=0, max_length=64))
    batch = collator(examples)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    padded = {k: batch[k] for k in ("input_ids", "attention_mask")}
    packed = {k: batch[k] for k in (*padded, *PAIR_KEYS)}
    return batch, labels, padded, packed


def test_same_log_probs_metrics_and_gradients_as_the_padded_rows():
    model = context_sensitive_model()
    assert use_segment_attention(model) == "varlen_sdpa"
    add_shared_prompt_forward(model)
    examples = random_pairs(3, seed=1)
    batch, labels, padded, packed = padded_and_packed(model, examples)
    weights = torch.randn(labels.shape[0], labels.shape[1] - 1)  # a loss that weighs every token differently
    results = {}
    for name, inputs in (("padded", padded), ("packed", packed)):
        model.zero_grad()
        out = model(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
        (out.log_probs * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[name] = (out, grads)
    (ref, ref_grads), (got, got_grads) = results["padded"], results["packed"]
    assert got.log_probs.shape == ref.log_probs.shape == (6, labels.shape[1] - 1)
    for field in OUTPUTS:
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.label_mask, ref.label_mask)
    assert ref.log_probs.abs().sum() > 0 and (ref.log_probs != 0).sum() == (labels[:, 1:] != -100).sum()
    for name, grad in ref_grads.items():  # rounding only: elementwise sums run in another order
        assert grad.norm() > 0 and (got_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_without_pair_keys_or_fused_head_the_padded_forward_runs():
    model = context_sensitive_model()
    use_segment_attention(model)
    add_shared_prompt_forward(model)
    batch, labels, padded, packed = padded_and_packed(model, random_pairs(2, seed=2))
    with torch.no_grad():
        plain = model(**padded).logits
        with_keys = model(**packed).logits  # TRL's return_outputs path: logits of the padded batch
    torch.testing.assert_close(with_keys, plain, rtol=0, atol=0)


def test_start_up_check_catches_attention_that_ignores_the_shared_prompt(monkeypatch):
    model = context_sensitive_model()
    use_segment_attention(model)
    add_shared_prompt_forward(model)
    collator = SharedPromptCollator(DataCollatorForPreference(pad_token_id=0))
    assert shared_prompt_mismatch(model, collator, 50) < 1e-5
    original = medtrain.attention._segment_attention

    def without_prefix(query, key, value, segment, *args):  # the reply segments lose their prompt
        return original(query, key, value, (segment[0], segment[1], segment[0], 0), *args)

    monkeypatch.setattr(medtrain.attention, "_segment_attention", without_prefix)
    assert shared_prompt_mismatch(model, collator, 50) > 0.1


# ---------------------------------------------------------------------------------------------------------------------
# The DPO stage with and without the shared-prompt rows


PAIRS = [
    {"conversations": [{"from": "human", "value": f"Question {i}: what helps with {topic}?"}],
     "chosen": f"Rest and water help with {topic}.", "rejected": "No."}
    for i, topic in enumerate(["fever", "a cough", "a headache", "a sore throat", "back pain", "insomnia"])
]


def run_dpo(model_dir, tmp_path, *extra):
    import dpo_training

    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", PAIRS).parent
    args = ["--model_name_or_path", model_dir, "--train_file_dir", data, "--output_dir", tmp_path / "out",
            "--per_device_train_batch_size", 3, "--max_steps", 2, "--logging_steps", 1, "--learning_rate", 5e-2,
            "--save_strategy", "no", "--report_to", "none", "--seed", 0, "--disable_tqdm", "True",
            "--validation_split_percentage", 0, "--do_eval", "False", *extra]
    return dpo_training.main([str(a) for a in args])


@pytest.mark.parametrize("extra", [(), ("--use_peft", "False", "--learning_rate", "1e-3"),
                                   ("--gradient_checkpointing", "True")], ids=["lora", "full", "checkpointing"])
def test_dpo_trains_the_same_with_shared_prompt_rows(extra, tiny_chat_model_dir, tmp_path, capsys):
    """LoRA (reference = adapter off), full training (a frozen reference copy gets the packed forward too) and
    gradient checkpointing (the segments pass through the checkpointed layers)."""
    shared = run_dpo(tiny_chat_model_dir, tmp_path / "shared", *extra)
    assert shared.shared_prompt and isinstance(shared.data_collator, SharedPromptCollator)
    assert "shared-prompt pair rows: one padding-free row per batch" in capsys.readouterr().out  # the run's log
    padded = run_dpo(tiny_chat_model_dir, tmp_path / "padded", *extra, "--shared_prompt", "False")
    assert not padded.shared_prompt and not isinstance(padded.data_collator, SharedPromptCollator)
    keys = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "entropy",
            "mean_token_accuracy", "num_tokens")
    for a, b in zip(shared.state.log_history[:2], padded.state.log_history[:2]):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert shared.state.log_history[1]["rewards/margins"] != 0.0  # the second step trained on a moved policy


def test_cpu_paths_off_keeps_trl_rows(tiny_chat_model_dir, tmp_path):
    trainer = run_dpo(tiny_chat_model_dir, tmp_path, "--cpu_paths", "off", "--max_steps", 1)
    assert not trainer.shared_prompt
    assert trainer.model.get_base_model().config._attn_implementation == "sdpa"


def test_failed_start_up_check_falls_back_to_padded_rows(tiny_chat_model_dir, tmp_path, capsys, monkeypatch):
    import medtrain.shared_prompt

    monkeypatch.setattr(medtrain.shared_prompt, "shared_prompt_mismatch", lambda *a: 0.5)
    trainer = run_dpo(tiny_chat_model_dir, tmp_path, "--max_steps", 1)
    assert not trainer.shared_prompt and not isinstance(trainer.data_collator, SharedPromptCollator)
    assert "shared-prompt pair rows off: on this model the packed row's log-probs differ" in capsys.readouterr().out
    assert trainer.model.get_base_model().config._attn_implementation == "sdpa"  # restored
