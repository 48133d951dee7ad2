"""The fused LoRA branch computes exactly PEFT's LoRA: outputs, gradients, dropout statistics, saving, fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import layer as lora_layer
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import MERGE_ATOL
from medtrain import fused_lora
from medtrain.fused_lora import (SPARSE_MAX_P, FusedLoraLinear, LoraBranch, draw_dropout, dropout_keep_mask,
                                 dropped_positions, fuse_lora_layers, keep_from_bits, keep_scale, keep_threshold,
                                 unfuse_lora_layers)


def tiny_peft_model(dropout: float, seed: int = 0, **lora_kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                target_modules="all-linear", **lora_kwargs))
    with torch.no_grad():  # lora_B starts at zero: make the branch matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return model


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


IDS = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(5))


def test_keep_threshold_and_mask_statistics():
    assert keep_threshold(0.0) == 0
    assert keep_threshold(0.5) == 2**15
    assert keep_threshold(0.05) == 3277  # p' = 0.0500031
    with pytest.raises(ValueError, match="dropout probability"):
        keep_threshold(1.0)
    with pytest.raises(ValueError, match="rounds to 1"):
        keep_threshold(1 - 2**-18)
    # exact: of all 65536 int16 bit patterns, 65536 - threshold are kept
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for p in (0.0, 0.05, 0.5, 0.9):
        assert int(keep_from_bits(every, keep_threshold(p)).sum()) == 2**16 - keep_threshold(p)
    torch.manual_seed(0)
    n, p = 400_000, 0.1
    first = dropout_keep_mask((n,), p, torch.device("cpu"))
    second = dropout_keep_mask((n,), p, torch.device("cpu"))
    assert first.dtype == torch.bool and first.shape == (n,)
    sigma = math.sqrt(p * (1 - p) / n)
    for mask in (first, second):
        assert abs(mask.float().mean().item() - (1 - p)) < 5 * sigma
    # fresh bits per call, independent of each other: P(both kept) = (1-p)^2
    assert not torch.equal(first, second)
    both = (first & second).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)
    # all four int16 quarters of each 64-bit word are uniform (the top one too: it holds the word's sign bit) and
    # uncorrelated: each keeps 1 - p, and neighbours agree as often as chance says
    quarters = first.view(-1, 4)
    for i in range(4):
        assert abs(quarters[:, i].float().mean().item() - (1 - p)) < 5 * sigma * 2
    expected = (1 - p) ** 2 + p**2
    for i in range(3):
        agree = (quarters[:, i] == quarters[:, i + 1]).float().mean().item()
        assert abs(agree - expected) < 5 * math.sqrt(expected * (1 - expected) / (n / 4))
    # an odd number of elements works
    assert dropout_keep_mask((3, 5), 0.5, torch.device("cpu")).shape == (3, 5)


def test_dropped_positions_are_bernoulli_and_do_not_depend_on_how_many_gaps_were_drawn(monkeypatch):
    torch.manual_seed(0)
    n, p = 400_000, 0.05
    first = dropped_positions(n, p, torch.device("cpu"))
    second = dropped_positions(n, p, torch.device("cpu"))
    for drops in (first, second):
        assert drops.dtype == torch.int64
        assert int(drops[0]) >= 0 and int(drops[-1]) < n and bool((drops.diff() > 0).all())  # sorted, unique, inside
        assert abs(drops.numel() / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    a, b = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    a[first], b[second] = True, True
    # fresh draws per call, independent of each other: P(both dropped) = p^2
    assert abs((a & b).float().mean().item() - p**2) < 5 * math.sqrt(p**2 * (1 - p**2) / n)
    # neighbours independent (geometric gaps): P(next one dropped too) = p; the first position is as likely as any
    assert abs((a[1:] & a[:-1]).float().mean().item() - p**2) < 5 * math.sqrt(p**2 * (1 - p**2) / n)
    starts = torch.tensor([int(dropped_positions(40, 0.25, torch.device("cpu"))[0]) == 0 for _ in range(4000)])
    assert abs(starts.float().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 4000)
    # a first draw short of the end is continued from where it stopped: the same positions as one long draw
    torch.manual_seed(1)
    whole = dropped_positions(50_000, 0.1, torch.device("cpu"))
    monkeypatch.setattr(fused_lora, "_first_draw", lambda numel, p: 7)
    torch.manual_seed(1)
    assert torch.equal(dropped_positions(50_000, 0.1, torch.device("cpu")), whole)
    monkeypatch.undo()
    assert dropped_positions(0, 0.1, torch.device("cpu")).numel() == 0
    # the draw and the scale by rate: positions up to SPARSE_MAX_P, the dense 16-bit mask above
    assert draw_dropout((3, 5), SPARSE_MAX_P, torch.device("cpu")).dtype == torch.int64
    assert draw_dropout((3, 5), 0.2, torch.device("cpu")).dtype == torch.bool
    assert keep_scale(0.05) == 1 / 0.95 and keep_scale(0.5) == 2.0 and keep_scale(0.3) == 2**16 / (2**16 - 19661)


def keep_mask(drop: torch.Tensor, shape) -> torch.Tensor:
    """The boolean keep-mask of a draw (dense masks as they are; positions -> all kept but those)."""
    if drop.dtype == torch.bool:
        return drop.view(shape)
    keep = torch.ones(math.prod(shape), dtype=torch.bool)
    keep[drop] = False
    return keep.view(shape)


def test_no_dropout_matches_peft_outputs_and_gradients():
    reference = tiny_peft_model(dropout=0.0)
    fused = tiny_peft_model(dropout=0.0)
    assert fuse_lora_layers(fused) == 14  # 7 linear layers per block, 2 blocks (lm_head excluded by all-linear)
    ref_loss, ref_grads = loss_and_grads(reference, IDS)
    loss, grads = loss_and_grads(fused, IDS)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def reference_branch(result, x, weight_a, weight_b, scaling, keep, p):
    """The textbook LoRA branch with an explicit inverted-dropout mask."""
    dropped = x * keep.view(x.shape).to(x.dtype) * keep_scale(p)
    return result + (dropped @ weight_a.t() @ weight_b.t()) * scaling


@pytest.mark.parametrize("p,in_place", [(0.05, True), (0.1, False), (0.5, True), (0.5, False)])
def test_dropout_branch_matches_reference_with_the_same_mask(p, in_place):
    gen = torch.Generator().manual_seed(3)
    result = torch.randn(2, 7, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 7, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    weight_a = torch.randn(4, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    weight_b = torch.randn(12, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 7, 12, generator=gen, dtype=torch.float64)

    torch.manual_seed(11)
    # the base layer's output as the model hands it over (a fresh non-leaf); non-contiguous: the out-of-place path
    base_out = result * 1.0 if in_place else result.transpose(0, 1).contiguous().transpose(0, 1)
    out = LoraBranch.apply(base_out, x, weight_a, weight_b, 2.0, p)
    assert (out.data_ptr() == base_out.data_ptr()) is in_place
    grads = torch.autograd.grad(out, (result, x, weight_a, weight_b), grad_out)
    torch.manual_seed(11)
    keep = keep_mask(draw_dropout((14, 10), p, x.device), (14, 10))  # the draw the branch made
    assert 0 < keep.sum() < keep.numel()
    expected = reference_branch(result, x, weight_a, weight_b, 2.0, keep, p)
    expected_grads = torch.autograd.grad(expected, (result, x, weight_a, weight_b), grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want, name in zip(grads, expected_grads, ("result", "x", "A", "B")):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("p", [0.1, 0.3])  # dropped positions, dense mask
def test_dropout_branch_passes_gradcheck(p):
    gen = torch.Generator().manual_seed(4)
    args = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
            for s in ((3, 6), (3, 5), (2, 5), (6, 2))]
    torch.manual_seed(0)
    assert 0 < (~keep_mask(draw_dropout((3, 5), p, torch.device("cpu")), (3, 5))).sum() < 15

    def fn(result, x, weight_a, weight_b):
        torch.manual_seed(0)  # the same draw on every evaluation
        return LoraBranch.apply(result * 1.0, x, weight_a, weight_b, 1.5, p)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_model_is_unbiased_and_off_in_eval(p):
    fused = tiny_peft_model(dropout=p)
    reference = tiny_peft_model(dropout=p)
    fuse_lora_layers(fused)
    fused.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=0, atol=1e-5)
        # training mode: different draws differ, their mean approaches the no-dropout output of one layer
        layer = fused.base_model.model.model.layers[0].self_attn.q_proj
        assert isinstance(layer, FusedLoraLinear)
        layer.train()
        x = torch.randn(4, 32)
        base = layer.base_layer(x)
        eval_delta = None
        layer.eval()
        eval_delta = layer(x) - base
        layer.train()
        draws = torch.stack([layer(x) - base for _ in range(4000)])
    assert not torch.allclose(draws[0], draws[1])
    error = (draws.mean(0) - eval_delta).abs().max().item()
    assert error < 6 * draws.std(0).max().item() / math.sqrt(4000)


@pytest.mark.parametrize("p", [0.05, 0.2])  # dropped positions, dense mask
def test_gradient_checkpointing_replays_the_same_mask(p):
    plain = tiny_peft_model(dropout=p)
    checkpointed = tiny_peft_model(dropout=p)
    for model in (plain, checkpointed):
        fuse_lora_layers(model)
        model.train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.enable_input_require_grads()
    loss, grads = loss_and_grads(plain, IDS, seed=7)
    ck_loss, ck_grads = loss_and_grads(checkpointed, IDS, seed=7)
    torch.testing.assert_close(ck_loss, loss, rtol=0, atol=1e-6)
    for name in grads:
        if "lora_" in name:
            torch.testing.assert_close(ck_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fallbacks_take_peft_paths():
    fused = tiny_peft_model(dropout=0.0)
    reference = tiny_peft_model(dropout=0.0)
    fuse_lora_layers(fused)
    fused.eval()
    reference.eval()
    with torch.no_grad():
        with reference.disable_adapter():
            base_logits = reference(input_ids=IDS).logits
        assert (base_logits - reference(input_ids=IDS).logits).abs().max() > 1e-2  # the adapter matters
        with fused.disable_adapter():
            torch.testing.assert_close(fused(input_ids=IDS).logits, base_logits, rtol=0, atol=1e-6)
        with torch.inference_mode():
            torch.testing.assert_close(fused(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=0,
                                       atol=1e-5)
        merged = fused.merge_and_unload()
        assert not any(isinstance(m, lora_layer.LoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=IDS).logits, reference(input_ids=IDS).logits, rtol=0,
                                   atol=MERGE_ATOL)


def test_dora_and_bias_layers_stay_on_peft_code():
    dora = tiny_peft_model(dropout=0.1, use_dora=True)
    fuse_lora_layers(dora)  # DoRA is a variant: the fused path declines per call
    layer = dora.base_model.model.model.layers[0].mlp.up_proj
    assert layer._fused_adapter(torch.randn(2, 32), (), {}) is None
    plain = tiny_peft_model(dropout=0.1)
    fuse_lora_layers(plain)
    layer = plain.base_model.model.model.layers[0].mlp.up_proj
    assert layer._fused_adapter(torch.randn(2, 32), (), {}) == "default"
    assert layer._fused_adapter(torch.randn(2, 32, dtype=torch.bfloat16), (), {}) == "default"  # bf16 base, fp32 adapter
    layer.lora_B["default"].to(torch.float64)
    assert layer._fused_adapter(torch.randn(2, 32), (), {}) is None  # adapter weights of two dtypes
    layer.lora_B["default"].to(torch.float32)
    assert layer._fused_adapter(torch.randn(2, 32), (), {"adapter_names": ["default"]}) is None
    layer.lora_dropout["default"].p = 0.5 - 2**-18  # within the 16-bit threshold's resolution: rounded, fused
    assert layer._fused_adapter(torch.randn(2, 32), (), {}) == "default"
    layer.lora_dropout["default"].p = 1 - 2**-18  # not representable by the 16-bit threshold
    assert layer._fused_adapter(torch.randn(2, 32), (), {}) is None


def test_saved_adapter_is_identical_and_reloads(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    fused = tiny_peft_model(dropout=0.1)
    assert fuse_lora_layers(fused) == 14
    fused.save_pretrained(tmp_path / "fused")
    assert unfuse_lora_layers(fused) == 14
    fused.save_pretrained(tmp_path / "plain")
    a = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    b = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)  # the same initialisation as tiny_peft_model's base
    base = LlamaForCausalLM(fused.get_base_model().config)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "fused")
    fused.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, fused(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_apply_lora_fuses_by_default_and_flag_turns_it_off():
    from medtrain.arguments import LoraArguments
    from medtrain.modeling import apply_lora

    def tiny():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))

    on = apply_lora(tiny(), LoraArguments(lora_rank=2))
    off = apply_lora(tiny(), LoraArguments(lora_rank=2, fused_lora=False))
    assert sum(type(m) is FusedLoraLinear for m in on.modules()) == 7
    assert not any(type(m) is FusedLoraLinear for m in off.modules())


def test_zero3_turns_fusion_off(monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    model = tiny_peft_model(dropout=0.1)
    assert fuse_lora_layers(model) == 0
    assert not any(type(m) is FusedLoraLinear for m in model.modules())


@pytest.mark.parametrize("p", [0.05, 0.3])  # dropped positions, dense mask
@pytest.mark.parametrize("x_dtype,dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_dropped_input_is_the_input_times_the_mask_in_the_branch_dtype(x_dtype, dtype, p):
    """The masked input the branch multiplies by A (forward, and rebuilt in backward) for every dtype pairing that
    autocast and a bf16 base with fp32 adapters produce: exactly ``x.to(dtype) * keep``, twice in a row (the
    per-thread buffers are reused, not read stale)."""
    from medtrain.fused_lora import _branch_input, _mask_in_place

    generator = torch.Generator().manual_seed(3)
    for rows in (64, 40):  # a smaller second input reuses the first one's buffers
        x = torch.randn(rows, 48, generator=generator).to(x_dtype)
        drop = draw_dropout(x.shape, p, x.device)
        keep = keep_mask(drop, x.shape)
        expected = x.to(dtype) * keep
        assert torch.equal(_branch_input(drop, x, dtype), expected)
        grad = torch.randn(rows, 48, generator=generator).to(dtype)
        assert torch.equal(_mask_in_place(drop, grad.clone()), grad * keep)
