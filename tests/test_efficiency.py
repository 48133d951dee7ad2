"""Packing, per-sequence attention, S2-Attn, NEFTune, rope scaling, the fused loss and MoE LoRA on tiny models."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import build_model, build_tokenizer, CHATML_TEMPLATE
from medtrain.attention import (enable_shift_attn, group_orders, packed_segments, register_varlen_attention,
                                s2_attention_forward)
from medtrain.efficiency import (PackedNEFTune, PackedRowsCollator, pack_sequences, packing_leak, packing_supported,
                                 sequence_lengths)
from medtrain.errors import ConfigError
from medtrain.fused_loss import linear_cross_entropy
from medtrain.rope import apply_recorded_rope_scaling, apply_rope_scaling
from medtrain.tokenization import IGNORE_INDEX

VOCAB = 97


def tiny_llama(attn: str = "sdpa", seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **overrides)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(register_varlen_attention() if attn == "varlen_sdpa" else attn)
    return model


def samples(lengths=(7, 11, 5), seed=1) -> list[dict]:
    """Random conversations: the first ~third of each is a prompt (label -100), the rest supervised."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        prompt = length // 3
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def one_row(examples: list[dict]) -> dict:
    return {"input_ids": sum((e["input_ids"] for e in examples), []), "labels": sum((e["labels"] for e in examples), []),
            "seq_lengths": [len(e["input_ids"]) for e in examples]}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token CE (0 where ignored), shape (batch, length - 1)."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none",
                           ignore_index=IGNORE_INDEX)


# --- packing ---------------------------------------------------------------------------------------------------------


def test_collator_positions_restart_and_boundary_labels_are_masked():
    collator = PackedRowsCollator(pad_token_id=0)
    batch = collator([
        {"input_ids": [11, 12, 13, 21, 22], "labels": [11, 12, 13, 21, 22], "seq_lengths": [3, 2]},
        {"input_ids": [31, 32, 33], "labels": [-100, 32, 33], "seq_lengths": [3]},
    ])
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    # each sequence's first label is -100 (the previous sequence must not learn to predict it); padding is -100
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, 32, 33, -100, -100]]
    assert batch["num_real_tokens"] == 8 and "attention_mask" not in batch


def test_pack_sequences_best_fit_decreasing_keeps_conversations_whole():
    from datasets import Dataset

    data = Dataset.from_list([{"input_ids": [n] * n, "labels": [n] * n} for n in (5, 3, 4, 2)])
    packed = pack_sequences(data, max_length=8)
    assert packed["seq_lengths"] == [[5, 3], [4, 2]]
    assert packed["input_ids"] == [[5] * 5 + [3] * 3, [4] * 4 + [2] * 2]
    with pytest.raises(ConfigError, match="longer than 4 tokens"):
        pack_sequences(data, max_length=4)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen_sdpa"])
def test_packed_loss_and_gradients_equal_unpacked(attn):
    model = tiny_llama(attn)
    examples = samples()
    packed = PackedRowsCollator(pad_token_id=0)([one_row(examples)])
    packed.pop("num_real_tokens")
    out = model(**packed, use_cache=False)
    out.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # per-sample losses from the packed logits equal each sample run alone
    per_token = token_losses(out.logits, packed["labels"])[0]
    start = 0
    sums, counts = [], []
    for example in examples:
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
        alone = token_losses(model(input_ids=ids, use_cache=False).logits, labels)[0]
        n = len(example["input_ids"])
        assert torch.allclose(per_token[start:start + n - 1], alone, atol=1e-5)
        sums.append(alone.sum())
        counts.append((labels[0, 1:] != IGNORE_INDEX).sum())
        start += n
    assert abs(out.loss.item() - (sum(sums) / sum(counts)).item()) < 1e-5
    # the same samples as an ordinary padded batch: same mean loss, same gradients
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples])
    mask = (torch.arange(width)[None] < torch.tensor([len(e["input_ids"]) for e in examples])[:, None]).long()
    padded = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    assert abs(padded.loss.item() - out.loss.item()) < 1e-5
    padded.loss.backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, packed_grads[name], atol=1e-5), name


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen_sdpa", "s2_sdpa"])
def test_perturbing_one_packed_sequence_leaves_the_others_logits_unchanged(attn, monkeypatch):
    import medtrain.attention

    model = tiny_llama("sdpa" if attn == "s2_sdpa" else attn)
    if attn == "s2_sdpa":
        enable_shift_attn(model, 0.25)
    calls = []
    original = medtrain.attention.packed_segments
    monkeypatch.setattr(medtrain.attention, "packed_segments", lambda p: calls.append(1) or original(p))
    # S2-Attn and the per-sequence kernel act in training mode only (the tiny model has no dropout)
    model.train(attn in ("s2_sdpa", "varlen_sdpa"))
    examples = samples((6, 9, 5))
    collator = PackedRowsCollator(pad_token_id=0)
    first = collator([one_row(examples)])
    examples[1]["input_ids"] = [(t + 7) % VOCAB for t in examples[1]["input_ids"]]
    second = collator([one_row(examples)])
    logits = [model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits for b in (first, second)]
    diff = (logits[0] - logits[1]).abs().amax(-1)[0]
    assert diff[:6].max() == 0 and diff[15:].max() == 0  # sequences 1 and 3: bit-identical
    assert diff[6:15].min() > 1e-3  # sequence 2 changed, so the test can see a change
    assert bool(calls) == (attn == "varlen_sdpa")  # the per-sequence path really ran
    # control: the same row without restarting positions is one causal sequence, and sequence 3 does see sequence 2
    plain = [model(input_ids=b["input_ids"], use_cache=False).logits for b in (first, second)]
    assert (plain[0] - plain[1])[0, 15:].abs().max() > 1e-3


def test_packing_probe_catches_an_attention_that_ignores_the_boundaries():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("test_causal_only", causal_only)
    AttentionMaskInterface.register("test_causal_only", sdpa_mask)
    model = tiny_llama("sdpa")
    assert packing_leak(model) == 0.0
    assert packing_supported(model, "sdpa") == (True, "attention stays within each packed sequence")
    model.set_attn_implementation("test_causal_only")
    assert packing_leak(model) > 1e-2
    ok, why = packing_supported(model, "test_causal_only")
    assert not ok and "not known to honour packed position_ids" in why


def test_packed_segments_from_position_ids():
    assert packed_segments(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])) == [
        [(0, 3), (3, 5), (5, 6)], [(0, 6)]]


# --- fused loss -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_cross_entropy_matches_the_plain_loss_and_gradients(with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True) if with_bias else None
    params = (hidden, weight, bias) if with_bias else (hidden, weight)
    targets = torch.randint(0, 50, (37,))
    loss, correct, entropy = linear_cross_entropy(hidden, weight, bias, targets, chunk=8)
    (loss / 3).backward()
    grads = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    logits = hidden @ weight.T + (bias if with_bias else 0)
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (reference / 3).backward()
    assert abs(loss.item() - reference.item()) < 1e-4 * reference.item()
    for mine, t in zip(grads, params):
        assert torch.allclose(mine, t.grad, atol=1e-5)
    assert correct.item() == (logits.argmax(-1) == targets).sum().item()
    expected_entropy = torch.distributions.Categorical(logits=logits).entropy().sum().item()
    assert abs(entropy.item() - expected_entropy) < 1e-3


def test_linear_cross_entropy_with_bf16_weights_matches_the_float_loss():
    torch.manual_seed(0)
    hidden = torch.randn(21, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (21,))
    loss, _, _ = linear_cross_entropy(hidden, weight, None, targets, chunk=8)
    loss.backward()
    reference = F.cross_entropy((hidden.detach() @ weight.T).float(), targets, reduction="sum")
    assert abs(loss.item() - reference.item()) < 1e-4 * reference.item()
    assert hidden.grad.dtype == torch.bfloat16 and hidden.grad.abs().sum() > 0


def test_linear_cross_entropy_reuses_its_tiles_and_reads_nothing_stale():
    """On CPU the (chunk, vocab) tiles are per-thread scratch buffers kept from call to call (no page faults per step):
    a larger call, then a smaller one of other data, then the larger again give each call's own loss and gradients."""
    from medtrain.scratch import scratch

    def run(rows, seed):
        torch.manual_seed(seed)
        hidden = torch.randn(rows, 16, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(50, 16, dtype=torch.bfloat16)
        targets = torch.randint(0, 50, (rows,))
        loss, correct, entropy = linear_cross_entropy(hidden, weight, None, targets, chunk=8)
        loss.backward()
        logits = (hidden.detach() @ weight.T).float()
        expected = F.cross_entropy(logits, targets, reduction="sum")
        expected_grad = ((logits.softmax(-1) - F.one_hot(targets, 50)) @ weight.float()).to(torch.bfloat16)
        assert abs(loss.item() - expected.item()) < 1e-4 * expected.item()
        assert correct.item() == (logits.argmax(-1) == targets).sum().item()
        torch.testing.assert_close(hidden.grad, expected_grad, rtol=0.02, atol=0.02)
        return loss.item()

    first = run(21, 0)
    tile = scratch("fused_loss.probs", (8, 50), torch.float32)
    run(5, 1)
    assert run(21, 0) == first
    assert scratch("fused_loss.probs", (8, 50), torch.float32).data_ptr() == tile.data_ptr()  # the same memory
    assert scratch("fused_loss.logits", (8, 50), torch.float32).data_ptr() != tile.data_ptr()  # names never alias


# --- S2-Attn ----------------------------------------------------------------------------------------------------------


class _Attention(torch.nn.Module):
    def __init__(self, ratio):
        super().__init__()
        self.shift_attn_ratio = ratio
        self.num_key_value_groups = 1
        self.is_causal = True


def _s2(query, key, value, ratio, training=True):
    module = _Attention(ratio).train(training)
    return s2_attention_forward(module, query, key, value, None, scaling=query.shape[-1] ** -0.5)[0]


def test_s2_with_one_group_equals_standard_causal_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 8) for _ in range(3))
    standard = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert torch.allclose(_s2(q, k, v, ratio=1.0), standard, atol=1e-6)
    assert torch.allclose(_s2(q, k, v, ratio=0.25, training=False), standard, atol=1e-6)  # eval: full attention


def test_s2_groups_are_causal_and_half_the_heads_are_shifted():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 16, 8) for _ in range(3))  # 16 tokens, ratio 0.25 -> 4 groups of 4
    assert group_orders(16, 4, False, "cpu").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert group_orders(16, 4, True, "cpu").tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13], [14, 15, 0, 1]]
    base = _s2(q, k, v, 0.25)

    def changed(token: int) -> tuple[list[int], list[int]]:
        """Output positions of heads 0-1 (unshifted) and 2-3 (shifted) that change when ``token``'s key/value do."""
        k2, v2 = k.clone(), v.clone()
        k2[:, :, token] += 1.0
        v2[:, :, token] += 1.0
        diff = (_s2(q, k2, v2, 0.25) - base).abs().amax(-1)[0]  # (length, heads)
        return ([i for i in range(16) if diff[i, :2].max() > 1e-6], [i for i in range(16) if diff[i, 2:].max() > 1e-6])

    # token 2: unshifted group [0..3] -> positions 2, 3; shifted group [2..5] -> 2..5
    assert changed(2) == ([2, 3], [2, 3, 4, 5])
    # token 5: unshifted group [4..7]; shifted group [2..5] (5 is its last token)
    assert changed(5) == ([5, 6, 7], [5])
    # token 14: shifted group wraps to [14, 15, 0, 1]; tokens 0 and 1 must NOT see the future token 14
    assert changed(14) == ([14, 15], [14, 15])
    # token 0: in the wrapped shifted group, tokens 1, 14, 15 come after it (causal by original position)
    assert changed(0) == ([0, 1, 2, 3], [0, 1, 14, 15])


def test_shift_attn_model_trains_and_refuses_unknown_families():
    model = tiny_llama("sdpa")
    assert enable_shift_attn(model, 0.25) == 2
    assert model.config._attn_implementation == "s2_sdpa"
    model.train()
    ids = torch.randint(0, VOCAB, (2, 16))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.config.model_type = "gpt2"
    with pytest.raises(ConfigError, match="--shift_attn supports llama, mistral"):
        enable_shift_attn(model, 0.25)
    with pytest.raises(ConfigError, match=r"--shift_attn_ratio must be in \(0, 1\]"):
        enable_shift_attn(model, 1.5)


# --- NEFTune ----------------------------------------------------------------------------------------------------------


def test_neftune_noise_matches_the_formula_in_training_and_is_zero_in_eval():
    alpha, dim = 5.0, 64
    model = tiny_llama("sdpa")
    ids = torch.randint(0, VOCAB, (1, 16))
    positions = torch.tensor([list(range(4)) + list(range(12))])  # a packed row: sequences of 4 and 12 tokens
    clean = model.get_input_embeddings()(ids).detach()
    hook = PackedNEFTune(model, alpha)
    captured = {}  # a hook registered after NEFTune's sees the noisy output
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: captured.update(out=o.detach()))
    model.train()
    torch.manual_seed(0)
    model(input_ids=ids, position_ids=positions, use_cache=False)
    noise = captured["out"] - clean
    for sl, length in ((slice(0, 4), 4), (slice(4, 16), 12)):
        bound = alpha / math.sqrt(length * dim)
        part = noise[0, sl].abs()
        assert part.max() <= bound * (1 + 1e-5)
        assert part.max() > 0.97 * bound  # uniform on [-bound, bound]: the largest of 256+ draws is near the edge
        assert abs(part.mean().item() - bound / 2) < 0.08 * bound  # mean |U(-b, b)| = b / 2
    # unpacked rows (no position_ids): L is the row width, exactly transformers' neftune_post_forward_hook
    assert sequence_lengths(None, torch.Size([2, 16]), "cpu").unique().tolist() == [16]
    model.eval()
    model(input_ids=ids, position_ids=positions, use_cache=False)
    assert torch.equal(captured["out"], clean)
    hook.remove()
    model.train()
    model(input_ids=ids, position_ids=positions, use_cache=False)
    assert torch.equal(captured["out"], clean)  # removed at the end of training


# --- rope scaling -----------------------------------------------------------------------------------------------------


def test_rope_scaling_factor_from_the_training_length_keeps_theta():
    config = LlamaConfig(max_position_embeddings=256, rope_theta=5000.0)
    assert apply_rope_scaling(config, "linear", max_length=1024) == 4.0
    assert config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0}
    assert config.max_position_embeddings == 1024
    config = LlamaConfig(max_position_embeddings=256)
    assert apply_rope_scaling(config, "dynamic", max_length=None, factor=2.0) == 2.0
    assert config.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert config.max_position_embeddings == 256  # dynamic NTK's threshold stays the original length
    assert apply_rope_scaling(LlamaConfig(max_position_embeddings=256), "linear", max_length=200) is None
    with pytest.raises(ConfigError, match="needs --model_max_length"):
        apply_rope_scaling(LlamaConfig(), "linear", max_length=None)


def _write_chat_data(directory):
    directory.mkdir(parents=True, exist_ok=True)
    pairs = [("What helps a fever?", "Rest and drink water."), ("What is hypertension?", "High blood pressure."),
             ("How to check diabetes?", "Check blood sugar."), ("发烧怎么办？", "多喝水，注意休息。")]
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in pairs]
    (directory / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
    return directory


def _sft(model_dir, data_dir, out_dir, *extra):
    import supervised_finetuning

    return supervised_finetuning.main([
        "--model_name_or_path", str(model_dir), "--train_file_dir", str(data_dir), "--output_dir", str(out_dir),
        "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--seed", "0", "--do_eval", "False", "--template_name", "chatml", *extra])


def test_sft_rope_scaling_is_saved_and_reloaded(tiny_model_dir, tmp_path):
    data = _write_chat_data(tmp_path / "data")
    full = tmp_path / "full"
    _sft(tiny_model_dir, data, full, "--use_peft", "False", "--max_steps", "1", "--model_max_length", "1024",
         "--rope_scaling", "linear")
    config = json.loads((full / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert config["max_position_embeddings"] == 1024
    reloaded = AutoModelForCausalLM.from_pretrained(full)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.allclose(reloaded.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq / 2)
    # a LoRA adapter has no model config: the scaling is recorded beside it and applied to the base on loading
    lora = tmp_path / "lora"
    _sft(tiny_model_dir, data, lora, "--max_steps", "1", "--rope_scaling", "dynamic", "--rope_scaling_factor", "3")
    assert json.loads((lora / "rope_scaling.json").read_text()) == {
        "max_position_embeddings": 512, "rope_parameters": {"factor": 3.0, "rope_theta": 10000.0, "rope_type": "dynamic"}}
    config = base.config.__class__.from_pretrained(tiny_model_dir)
    assert apply_recorded_rope_scaling(config, str(tiny_model_dir), str(lora))
    assert config.rope_parameters["rope_type"] == "dynamic" and config.rope_parameters["factor"] == 3.0


def test_flash_attn_and_shift_attn_refused_with_clear_messages(tiny_model_dir):
    from medtrain.arguments import LoraArguments, ModelArguments, check_arguments

    flash = {"model_name_or_path": "m", "attn_implementation": "flash_attention_2"}
    with pytest.raises(ConfigError, match="--attn_implementation flash_attention_2 needs a CUDA GPU; on CPU leave it"):
        check_arguments(ModelArguments(**flash), LoraArguments(), object())
    with pytest.raises(ConfigError, match="--shift_attn runs its own grouped attention on sdpa: drop "
                                          "--attn_implementation flash_attention_2"):
        ModelArguments(**flash, shift_attn=True)


# --- SFT end to end: packing default, token metrics, MoE ---------------------------------------------------------------


def test_sft_packs_by_default_and_reports_supervised_tokens(tiny_chat_model_dir, tmp_path):
    from medtrain.fused_loss import EfficientSFTTrainer

    data = _write_chat_data(tmp_path / "data")
    trainer = _sft(tiny_chat_model_dir, data, tmp_path / "packed", "--num_train_epochs", "1", "--neftune_noise_alpha", "5")
    assert isinstance(trainer, EfficientSFTTrainer) and trainer._fused
    assert trainer.model.config._attn_implementation == "varlen_sdpa"
    assert isinstance(trainer.data_collator, PackedRowsCollator)
    rows = trainer.train_dataset
    assert len(rows) == 1 and len(rows["seq_lengths"][0]) == 4  # the 4 short conversations fit one row
    assert trainer.state.global_step == 1
    assert trainer.args.neftune_noise_alpha is None  # packed rows: our per-sequence NEFTune, not transformers'
    results = json.loads((tmp_path / "packed" / "train_results.json").read_text())
    supervised = sum(1 for labels in rows["labels"] for label in labels if label != IGNORE_INDEX)
    assert results["train_supervised_tokens"] == supervised and results["train_samples"] == 4
    assert results["train_tokens"] == sum(map(len, rows["input_ids"]))
    # --packing False: padded batches, transformers' NEFTune, 2 steps of 2 samples
    plain = _sft(tiny_chat_model_dir, data, tmp_path / "plain", "--num_train_epochs", "1", "--packing", "False",
                 "--neftune_noise_alpha", "5")
    assert plain.state.global_step == 2 and plain.args.neftune_noise_alpha == 5.0
    assert plain.model.config._attn_implementation == "sdpa" and "seq_lengths" not in plain.train_dataset.column_names


def test_moe_lora_reports_the_router_aux_loss(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    model_dir = tmp_path / "mixtral"
    tokenizer = build_tokenizer(model_dir, chat_template=CHATML_TEMPLATE)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, router_aux_loss_coef=0.02,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    MixtralForCausalLM(config).save_pretrained(model_dir)
    data = _write_chat_data(tmp_path / "data")
    trainer = _sft(model_dir, data, tmp_path / "out", "--max_steps", "3", "--learning_rate", "1e-3",
                   "--target_modules", "q_proj,k_proj,v_proj,o_proj")
    aux = [entry["aux_loss"] for entry in trainer.state.log_history if "aux_loss" in entry]
    assert len(aux) == 3 and all(1.5 < a < 3.0 for a in aux), aux  # top-2 of 4 near-uniform experts: ~2
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_parameters() if "lora_" in n}
    assert lora == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # the trained loss includes coef * aux: the fused loss equals the model's own on the same batch
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[0]])
    batch.pop("num_real_tokens", None)
    with torch.no_grad():
        own = model(**batch, output_router_logits=True, use_cache=False)
        fused = trainer.compute_loss(model, dict(batch))
    assert abs(fused.item() - own.loss.item()) < 1e-5 and own.aux_loss > 0


# --- CPU allocator ----------------------------------------------------------------------------------------------------

# As in a stage: torch/transformers/trl are imported at the top of the script, start_run applies the settings later.
_THP_CODE = """
import trl, torch
from medtrain.allocator import apply_allocator_settings
apply_allocator_settings()
x = torch.ones(50_000_000)
print(next(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))
"""


def _anon_huge_kb(env_value: str | None) -> int:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _THP_CODE], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_start_run_allocator_settings_put_large_tensors_in_huge_pages_after_torch_is_imported_unless_turned_off():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.is_file() or "[never]" in thp.read_text() or not Path("/proc/self/smaps_rollup").is_file():
        pytest.skip("transparent huge pages are unavailable on this machine")
    assert _anon_huge_kb(None) >= 100_000  # most of the 200 MB tensor
    assert _anon_huge_kb("0") == 0


_REUSE_CODE = """
import os, torch
from medtrain.allocator import apply_allocator_settings
apply_allocator_settings()
page = os.sysconf("SC_PAGE_SIZE")
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
def returned_mb():
    x = torch.empty(16_000_000).fill_(1.0)  # 61 MiB: above glibc's default (dynamic, <= 32 MB) mmap threshold
    with_block = resident_mb()
    del x
    return with_block - resident_mb()
returned_mb()
print(min(returned_mb() for _ in range(3)))
"""


def _returned_mb(env_value: str | None) -> float:
    """MB of resident memory a freed 61 MiB tensor gives back to the kernel (in a fresh interpreter)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MEDTRAIN_KEEP_FREED_MEMORY" and not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    if env_value is not None:
        env["MEDTRAIN_KEEP_FREED_MEMORY"] = env_value
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _REUSE_CODE], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_start_run_allocator_settings_keep_freed_large_blocks_unless_turned_off():
    if not sys.platform.startswith("linux") or not _glibc():
        pytest.skip("glibc malloc only")
    # Kept, a freed 61 MiB tensor stays resident for the next step's allocations to reuse without faulting pages in
    # again; turned off, glibc munmaps it and the next one is faulted in afresh. (Resident memory rather than a
    # page-fault count: the count also sees the kernel's huge-page bookkeeping and once read 296 with the memory kept.)
    assert _returned_mb(None) < 4
    assert _returned_mb("0") > 50  # 16M float32 = 61 MiB


def test_malloc_settings_from_the_environment_are_left_alone(monkeypatch):
    from medtrain.allocator import keep_freed_memory

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES",
                 "MEDTRAIN_KEEP_FREED_MEMORY"):
        monkeypatch.delenv(name, raising=False)
    assert keep_freed_memory() is (sys.platform.startswith("linux") and _glibc())
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MEDTRAIN_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    return True
