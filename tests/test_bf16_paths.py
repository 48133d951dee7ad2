"""Our custom training paths (fused LoRA branch, fused loss, per-sequence attention) under bf16: they compute in bf16
where the stock PEFT/transformers path does, keep adapter weights and gradients in fp32, and match fp32 losses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from medtrain.attention import register_varlen_attention
from medtrain.efficiency import PackedRowsCollator
from medtrain.fused_lora import FusedLoraLinear, fuse_lora_layers
from medtrain.fused_loss import linear_cross_entropy
from medtrain.tokenization import IGNORE_INDEX

VOCAB = 97
BF16 = torch.bfloat16
MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_")  # the entropy einsum (aten::bmm) stays fp32 on purpose


def matmul_dtypes(fn) -> list[tuple[str, list, tuple]]:
    """Run ``fn`` under the profiler; (op, input shapes, input dtypes) of every matmul kernel it ran (after autocast's
    casts, backward included)."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return [(e.name, e.input_shapes, tuple(d for d in e.input_dtypes if d)) for e in prof.events()
            if e.name in MATMULS]


def dtypes_of(seen) -> set[str]:
    return {d for _, _, dtypes in seen for d in dtypes if d != "Scalar"}


def tiny_lora_model(dtype=torch.float32, dropout=0.0, seed=0, attn="varlen") -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base = LlamaForCausalLM(config).to(dtype)
    base.set_attn_implementation(register_varlen_attention() if attn == "varlen" else attn)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():  # lora_B starts at zero: make the branch matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return model


def packed_batch(seed=1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in ((9, 14, 7), (20, 10)):
        ids, labels = [], []
        for n in lengths:
            seq = torch.randint(3, VOCAB, (n,), generator=generator).tolist()
            ids += seq
            labels += [IGNORE_INDEX] * (n // 3) + seq[n // 3:]
        rows.append({"input_ids": ids, "labels": labels, "seq_lengths": list(lengths)})
    batch = PackedRowsCollator(pad_token_id=0)(rows)
    batch.pop("num_real_tokens")
    return batch


def fused_step_loss(model, batch) -> torch.Tensor:
    """What EfficientSFTTrainer.compute_loss does: hidden states of the backbone, supervised positions, fused loss."""
    captured = {}
    base = model.get_base_model()
    handle = base.model.register_forward_hook(lambda m, i, o: captured.update(h=o.last_hidden_state))
    try:
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    head = base.get_output_embeddings()
    loss_sum, _, _ = linear_cross_entropy(captured["h"][:, :-1][mask], head.weight, head.bias, targets[mask])
    return loss_sum / mask.sum()


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# --- fused LoRA branch -----------------------------------------------------------------------------------------------


def test_fused_lora_under_autocast_runs_bf16_matmuls_and_matches_peft():
    reference = tiny_lora_model(dropout=0.0)
    fused = copy.deepcopy(reference)
    assert fuse_lora_layers(fused) > 0
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedLoraLinear)
    x = torch.randn(3, 11, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ref_layer = reference.base_model.model.model.layers[0].self_attn.q_proj
    with torch.autocast("cpu", dtype=BF16):
        out_ref = ref_layer(x_ref)
        outputs = []
        forward = matmul_dtypes(lambda: outputs.append(layer(x)))
    out = outputs[0]
    # PEFT under autocast gives a bf16 output; so do we, and every matmul (base layer, our branch) ran in bf16
    assert out_ref.dtype == BF16 and out.dtype == BF16
    assert len(forward) >= 3 and dtypes_of(forward) == {"c10::BFloat16"}, forward
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(out, dtype=torch.float32).to(BF16)
    backward = matmul_dtypes(lambda: out.backward(grad))
    out_ref.backward(grad)
    # input gradient of the base layer + three products of the branch, all bf16
    assert len(backward) >= 4 and dtypes_of(backward) == {"c10::BFloat16"}, backward
    # adapter weights and their gradients stay fp32; the input gradient comes back in the input's dtype
    for name in ("lora_A", "lora_B"):
        mine, theirs = getattr(layer, name)["default"].weight, getattr(ref_layer, name)["default"].weight
        assert mine.dtype == torch.float32 and mine.grad.dtype == torch.float32
        assert mine.grad.abs().sum() > 0
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=3e-2, atol=3e-2 * theirs.grad.abs().max().item())
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=3e-2, atol=3e-2 * x_ref.grad.abs().max().item())


def test_fused_lora_with_bf16_base_and_fp32_adapter_computes_the_branch_in_fp32_like_peft():
    reference = tiny_lora_model(dtype=BF16, dropout=0.0)
    layer_ref = reference.base_model.model.model.layers[1].mlp.down_proj
    assert layer_ref.lora_A["default"].weight.dtype == torch.float32  # PEFT keeps adapters in fp32 (autocast_adapter_dtype)
    fused = copy.deepcopy(reference)
    fuse_lora_layers(fused)
    layer = fused.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, 96, dtype=BF16)
    outputs = []
    seen = matmul_dtypes(lambda: outputs.append(layer(x)))
    out, out_ref = outputs[0], layer_ref(x)
    assert out.dtype == out_ref.dtype == BF16
    # the base layer in bf16; the branch's products (an operand of width r = 4) in fp32, as PEFT computes them
    branch = [event for event in seen if any(4 in shape for shape in event[1])]
    assert len(branch) == 2 and dtypes_of(branch) == {"float"}, seen
    assert dtypes_of([event for event in seen if event not in branch]) == {"c10::BFloat16"}
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)


# --- fused loss --------------------------------------------------------------------------------------------------------


def test_fused_loss_under_autocast_uses_bf16_matmuls_and_fp32_softmax():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (37,))
    results = []
    with torch.autocast("cpu", dtype=BF16):
        seen = matmul_dtypes(lambda: results.append(linear_cross_entropy(hidden, weight, None, targets, chunk=8)))
    loss = results[0][0]
    # 5 chunks: logits and the hidden gradient per chunk, in bf16
    assert len(seen) == 10 and dtypes_of(seen) == {"c10::BFloat16"}, seen
    assert loss.dtype == torch.float32
    loss.backward()
    assert hidden.grad.dtype == torch.float32
    # the reference: what the stock path computes under autocast (bf16 logits, fp32 cross-entropy)
    logits = (hidden.detach().to(BF16) @ weight.to(BF16).T).float()
    expected = F.cross_entropy(logits, targets, reduction="sum")
    assert abs(loss.item() - expected.item()) < 1e-4 * expected.item()
    fp32 = F.cross_entropy(hidden.detach() @ weight.T, targets, reduction="sum")
    assert abs(loss.item() - fp32.item()) < 2e-2 * fp32.item()
    # without autocast the same call stays fp32
    seen = matmul_dtypes(lambda: linear_cross_entropy(hidden, weight, None, targets, chunk=8))
    assert len(seen) == 10 and dtypes_of(seen) == {"float"}


# --- a whole tiny training step ------------------------------------------------------------------------------------


def attention_calls(model, batch, monkeypatch, autocast: bool) -> tuple[list, list]:
    """(dtypes of the sdpa outputs, dtypes of the matmul-attention outputs) of one forward of the packed batch."""
    import medtrain.attention as attention

    sdpa_out, matmul_out = [], []
    sdpa, matmul = F.scaled_dot_product_attention, attention._matmul_attention

    def spy_sdpa(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        sdpa_out.append(out.dtype)
        return out

    def spy_matmul(*args, **kwargs):
        out = matmul(*args, **kwargs)
        matmul_out.append((out.dtype, args[0].shape[2]))
        return out

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(attention, "_matmul_attention", spy_matmul)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return sdpa_out, matmul_out


@pytest.mark.parametrize("weights", [torch.float32, BF16])
def test_varlen_attention_runs_bf16_segments_as_matmuls_and_long_ones_through_sdpa(weights, monkeypatch):
    import medtrain.attention as attention

    model, batch = tiny_lora_model(dtype=weights), packed_batch()
    # under autocast (fp32 weights leave the queries fp32 after the rotary embedding; bf16 weights make them bf16)
    # every packed sequence (9, 14, 7 | 20, 10 tokens) of both layers runs as bf16 matmuls, none through sdpa
    sdpa_out, matmul_out = attention_calls(model, batch, monkeypatch, autocast=True)
    assert sdpa_out == [] and len(matmul_out) == 10 and {dtype for dtype, _ in matmul_out} == {BF16}
    # segments above the key limit go to sdpa (which autocast lowers to bf16), the others stay matmuls
    monkeypatch.setattr(attention, "MATMUL_ATTENTION_MAX_KEYS", 10)
    sdpa_out, matmul_out = attention_calls(model, batch, monkeypatch, autocast=True)
    assert sdpa_out == [BF16] * 4 and sorted(n for _, n in matmul_out) == [7, 7, 9, 9, 10, 10]


def test_bf16_rows_of_one_sequence_run_as_matmuls_only_without_padding(monkeypatch):
    """Rows holding one sequence each (PT blocks): bf16 matmuls per row when transformers built no mask, one sdpa call
    over the batch when the rows are padded (the matmul path ignores masks)."""
    import medtrain.attention as attention

    model = tiny_lora_model(dtype=BF16)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(12)[None].expand(2, -1)
    seen = {"sdpa": 0, "matmul": 0}
    sdpa, matmul = F.scaled_dot_product_attention, attention._matmul_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, **k: seen.__setitem__("sdpa", seen["sdpa"] + 1) or sdpa(*a, **k))
    monkeypatch.setattr(attention, "_matmul_attention",
                        lambda *a, **k: seen.__setitem__("matmul", seen["matmul"] + 1) or matmul(*a, **k))
    padded = torch.ones(2, 12, dtype=torch.long)
    padded[1, 9:] = 0
    outputs = {}
    for name, mask in (("full", torch.ones(2, 12, dtype=torch.long)), ("padded", padded)):
        seen.update(sdpa=0, matmul=0)
        with torch.autocast("cpu", dtype=BF16):
            outputs[name] = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        outputs[name + " calls"] = dict(seen)
    assert outputs["full calls"] == {"sdpa": 0, "matmul": 4}  # 2 rows x 2 layers
    assert outputs["padded calls"] == {"sdpa": 2, "matmul": 0}  # one call per layer over the batch
    # the unpadded row computes the same either way, within bf16 rounding
    torch.testing.assert_close(outputs["padded"][0].float(), outputs["full"][0].float(), atol=0.05, rtol=0.05)


def test_varlen_attention_in_fp32_runs_sdpa(monkeypatch):
    sdpa_out, matmul_out = attention_calls(tiny_lora_model(), packed_batch(), monkeypatch, autocast=False)
    assert sdpa_out == [torch.float32] * 10 and matmul_out == []


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("length,prefix", [(1, 0), (13, 0), (6, 9), (11, 4)])
@pytest.mark.parametrize("scores_per_block", [1 << 19, 100])
def test_matmul_attention_equals_sdpa(heads, kv_heads, length, prefix, scores_per_block, monkeypatch):
    """Outputs and gradients of the bmm -> softmax -> bmm attention against sdpa with the same mask: exact in fp32
    (GQA grouping, bottom-right causal mask after a shared prefix, queries cut into blocks), within bf16 rounding in
    bf16."""
    import medtrain.attention as attention
    from medtrain.attention import _matmul_attention

    monkeypatch.setattr(attention, "SCORES_PER_BLOCK", scores_per_block)  # 100: 2-12 blocks of queries here

    generator = torch.Generator().manual_seed(heads * 100 + length * 10 + prefix)
    q = torch.randn(1, heads, length, 16, generator=generator).requires_grad_()
    k, v = (torch.randn(1, kv_heads, prefix + length, 16, generator=generator).requires_grad_() for _ in range(2))
    grad_out = torch.randn(1, heads, length, 16, generator=generator)
    allowed = torch.ones(length, prefix + length, dtype=torch.bool).tril(prefix)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad_out)
    for dtype, tolerance in ((torch.float32, 1e-5), (BF16, 5e-2)):
        out = _matmul_attention(q, k, v, None, dtype)
        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
        assert out.dtype == dtype and out.shape == reference.shape
        torch.testing.assert_close(out.float(), reference, atol=tolerance, rtol=tolerance)
        for grad, expected in zip(grads, reference_grads):
            assert grad.dtype == torch.float32  # the inputs' dtype: the casts are differentiated through
            torch.testing.assert_close(grad, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights+autocast"])
def test_bf16_training_step_matches_fp32_loss_and_gradients_flow(mode):
    batch = packed_batch()
    fp32 = tiny_lora_model()
    fuse_lora_layers(fp32)
    loss32 = fused_step_loss(fp32, batch)
    loss32.backward()
    low = tiny_lora_model(dtype=BF16 if "weights" in mode else torch.float32)
    fuse_lora_layers(low)
    with torch.autocast("cpu", dtype=BF16):
        loss16 = fused_step_loss(low, batch)
    loss16.backward()
    assert loss16.dtype == torch.float32
    # tolerance: bf16 keeps 8 mantissa bits (relative rounding 2**-9 = 0.2% per op); over 2 layers and the LM head
    # the loss of this tiny model moves by well under 1%
    assert abs(loss16.item() - loss32.item()) < 0.01 * loss32.item(), (loss16.item(), loss32.item())
    grads16, grads32 = lora_grads(low), lora_grads(fp32)
    assert grads16.keys() == grads32.keys() and len(grads16) == 2 * 7 * 2
    for name, grad in grads16.items():
        assert grad is not None and grad.dtype == torch.float32, name
        assert grad.abs().sum() > 0, name
        cos = F.cosine_similarity(grad.flatten(), grads32[name].flatten(), dim=0)
        assert cos > 0.98, (name, cos.item())


def test_last_positions_keeps_the_same_logits_and_the_lm_head_is_one_matmul():
    """logits_to_keep as an index tensor: the logits of the int form, and under bf16 the LM head is one ``mm`` over the
    gathered rows (the int form's strided slice makes matmul copy the head weight once per row into a ``bmm``)."""
    from medtrain.modeling import last_positions

    model = tiny_lora_model(dtype=BF16).eval()  # eval: attention runs sdpa, so a bmm can only come from the head
    batch = packed_batch()
    length = batch["input_ids"].shape[1]
    assert last_positions(length, 3, "cpu").tolist() == [length - 3, length - 2, length - 1]

    def head_ops(keep):
        with torch.autocast("cpu", dtype=BF16), torch.profiler.profile() as prof:
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           logits_to_keep=keep).logits
        return logits, [e.name for e in prof.events() if e.name in ("aten::mm", "aten::bmm")]

    by_int, int_ops = head_ops(3)
    by_index, index_ops = head_ops(last_positions(length, 3, "cpu"))
    torch.testing.assert_close(by_index, by_int, atol=0, rtol=0)
    assert by_index.shape[:2] == (batch["input_ids"].shape[0], 3)
    assert "aten::bmm" in int_ops and "aten::bmm" not in index_ops, (int_ops, index_ops)
