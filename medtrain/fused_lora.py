"""A leaner LoRA branch for PEFT's ``lora.Linear``: same math, fewer passes over memory, <= 1 byte/element kept for
dropout.

PEFT computes ``result + lora_B(lora_A(dropout(x))) * scaling``. On CPU that costs, per adapted layer and token:
a Bernoulli draw (single-threaded, ~8 ns/element), a float noise tensor and a dropped copy of the input (both kept
for backward: 8 bytes/element), and three full-width temporaries for ``lora_B(...)``, ``* scaling`` and ``+``. For
SmolLM2-135M with LoRA on all linear layers at 4 x 512 tokens that is ~30% of a training step and ~1.6 GB of peak
memory (measured; see bench/bench_sft.py).

:class:`LoraBranch` computes the same function in one autograd node:

- dropout draws from the default generator (so seeding, Trainer's RNG checkpoints and gradient-checkpoint
  recomputation behave as usual). At the usual LoRA rates (``p <= 1/8``) it draws only the positions of the dropped
  elements, as geometric gaps between them (one fp32 uniform per dropped element, ~5% of the elements at p = 0.05):
  exactly Bernoulli(p) per element up to the fp32 draw's 2**-24 resolution, kept elements scaled by ``1 / (1 - p)``.
  On CPU that is 0.5 ms per 2048 x 576 input against 1.8 ms for the dense mask below, and the dropped input is a
  copy with those positions zeroed (no mask pass, no multiply). Higher rates draw a dense mask: an element is kept
  when 16 random bits (a quarter of a 64-bit draw) reach ``round(p * 2**16)``, kept elements scaled by
  ``1 / (1 - p')`` with ``p' = round(p * 2**16) / 2**16`` (|p - p'| <= 7.7e-6). ``bernoulli_`` costs 4x the mask;
- only the dropped positions (8 bytes per dropped element: 0.4 bytes per element at p = 0.05) or the boolean
  keep-mask (1 byte per element) and the (tokens, r) product are saved; the input is saved by reference (the base
  layer's caller holds it anyway) and the dropped input is rebuilt in backward;
- ``result + scale * (x_kept @ A.T) @ B.T`` is one ``addmm_`` into the base layer's fresh output (no copy of it).

Precision follows PEFT's own path: under ``torch.autocast`` the branch's matmuls run in the autocast dtype (bf16 on
CPU: the input and the fp32 adapter weights are cast per call, as autocast casts them for ``nn.Linear``); without
autocast they run in the adapter weights' dtype (PEFT casts the input to it: with a bf16 base and fp32 adapters the
branch runs in fp32 and is added to the bf16 base output). Adapter weights, their gradients and the optimizer state
stay in the weights' own dtype (fp32); the input gradient is returned in the input's dtype.

:func:`fuse_lora_layers` switches plain ``lora.Linear`` layers to :class:`FusedLoraLinear` (a subclass: saving,
merging, ``disable_adapter()`` and multi-adapter use are PEFT's own code paths, taken whenever the fused path does
not apply: merged or disabled adapters, several active adapters, DoRA and other variants, LoRA bias, adapter
weights of different dtypes, per-call adapter names).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from peft.tuners.lora import layer as lora_layer

from .scratch import scratch

logger = logging.getLogger(__name__)

BITS = 16
RESOLUTION = 1 << BITS


def keep_threshold(p: float) -> int:
    """Smallest 16-bit value that keeps an element: P(keep) = 1 - threshold / 2**16."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    threshold = round(p * RESOLUTION)
    if threshold >= RESOLUTION:
        raise ValueError(f"dropout probability {p} rounds to 1 at {BITS}-bit resolution")
    return threshold


def keep_from_bits(bits: torch.Tensor, threshold: int) -> torch.Tensor:
    """Keep-mask from uniform int16 ``bits``: the signed value + 2**15 is the unsigned one, compared without a copy."""
    return bits >= threshold - RESOLUTION // 2


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask of ``shape``; each element is kept independently with probability 1 - keep_threshold(p) / 2**16.

    ``random_(-2**63, None)`` fills all 64 bits of each int64 word uniformly (plain ``random_()`` leaves the sign bit
    0), so each of its four int16 quarters is a uniform 16-bit value.
    """
    numel = 1
    for size in shape:
        numel *= size
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    return keep_from_bits(words.view(torch.int16)[:numel].view(shape), keep_threshold(p))


SPARSE_MAX_P = 0.125
"""Dropout rates up to this draw the dropped positions (8 bytes each: at most the dense mask's 1 byte per element on
average); higher rates draw the dense keep-mask."""


def _first_draw(numel: int, p: float) -> int:
    """How many gaps to draw at once for ``numel`` elements: the expected number of drops + 6 sigma (+16)."""
    mean = numel * p
    return int(mean + 6 * math.sqrt(mean) + 16)


def dropped_positions(numel: int, p: float, device: torch.device) -> torch.Tensor:
    """Sorted flat positions (int64) of the elements of ``numel`` that dropout drops, each independently with
    probability ``0 < p < 1``.

    The gaps between consecutive drops are geometric, ``1 + floor(log(1 - u) / log(1 - p))`` for fp32 uniforms
    ``u`` in [0, 1) (at most 2**-24 from the exact distribution). The first draw covers ``numel`` but for a 6-sigma
    shortfall; then more gaps are drawn from where it stopped, so the positions are those of one long draw (only the
    generator's state afterwards depends on how many were drawn at once).
    """
    log_keep = math.log1p(-p)
    pieces, start = [], 0  # start: the first position no gap has reached yet
    while True:
        u = torch.empty(_first_draw(numel - start, p), dtype=torch.float32, device=device).uniform_()
        gaps = torch.log1p(u.neg_()).div_(log_keep).floor_().add_(1).to(torch.int64)
        positions = torch.cumsum(gaps, 0).add_(start - 1)
        pieces.append(positions)
        last = int(positions[-1])
        if last >= numel:
            break
        start = last + 1
    positions = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return positions[: int(torch.searchsorted(positions, numel))]


def draw_dropout(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """One dropout draw for an input of ``shape``: the dropped positions (int64, see :func:`dropped_positions`) when
    ``p <= SPARSE_MAX_P``, else the boolean keep-mask of :func:`dropout_keep_mask`."""
    if p <= SPARSE_MAX_P:
        return dropped_positions(math.prod(shape), p, device)
    return dropout_keep_mask(shape, p, device)


def keep_scale(p: float) -> float:
    """The inverted-dropout scale of the kept elements of :func:`draw_dropout`'s draw at rate ``p``."""
    if p <= SPARSE_MAX_P:
        return 1.0 / (1.0 - p)
    return RESOLUTION / (RESOLUTION - keep_threshold(p))


def _masked_into(out: torch.Tensor, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out = x * keep`` (as ``nn.Dropout`` masks, before its scale); ``out`` must not overlap ``x``.

    The mask's bytes are written into ``out`` and multiplied by ``x`` in place. On CPU (bf16, 2048 x 576, 1 thread)
    that takes 0.35 ms against 1.0 ms for ``where(keep, x, 0)`` and 1.6 ms for a product with the bool tensor; a
    product with the uint8 view is as fast but allocates a cast of the mask on every call, which raised the SFT
    bench's peak RSS by 0.3 GB.
    """
    return out.copy_(keep.view(torch.uint8)).mul_(x)


def _dropped(drop: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` with ``drop``'s elements zeroed, for an immediate matmul (on CPU in a per-thread scratch buffer)."""
    out = scratch("fused_lora.dropped", x.shape, x.dtype, x.device)
    if drop.dtype == torch.bool:
        return _masked_into(out, drop, x)
    out.copy_(x).view(-1).index_fill_(0, drop, 0)
    return out


def _mask_in_place(drop: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` (contiguous) with ``drop``'s elements zeroed in place (a dense mask goes through a per-thread buffer
    holding it in ``x``'s dtype on CPU)."""
    if drop.dtype != torch.bool:
        x.view(-1).index_fill_(0, drop, 0)
        return x
    if x.device.type != "cpu":
        return x.mul_(drop)
    return x.mul_(scratch("fused_lora.mask", x.shape, x.dtype).copy_(drop.view(torch.uint8)))


def branch_dtype(x: torch.Tensor, weight_a: torch.Tensor) -> torch.dtype:
    """The dtype PEFT's LoRA branch computes in for input ``x``: autocast's when it is on for ``x``'s device, else the
    adapter weights' (PEFT casts the input to ``lora_A``'s dtype)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight_a.dtype


class LoraBranch(torch.autograd.Function):
    """``result + scaling * (dropout(x) @ weight_a.T) @ weight_b.T`` with the saved state described in the module doc.

    The matmuls run in ``dtype`` (see :func:`branch_dtype`); autocast is off inside, every cast is explicit.
    ``result`` (the base layer's output) is updated in place and returned when it is contiguous, not a leaf and of
    ``dtype``; otherwise the sum is a new tensor of ``result``'s dtype.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                scaling: float, p: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or weight_a.dtype
        with torch.autocast(x.device.type, enabled=False):
            flat_x = x.reshape(-1, x.shape[-1])
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            drop = None
            scale = scaling
            if p > 0.0:
                drop = draw_dropout(flat_x.shape, p, flat_x.device)
                scale = scaling * keep_scale(p)
            xa = _branch_input(drop, flat_x, dtype) @ a.t()
            ctx.save_for_backward(flat_x, drop, xa, weight_a, weight_b)
            ctx.scale = scale
            ctx.x_shape = x.shape
            ctx.dtype = dtype
            flat_result = result.view(-1, result.shape[-1]) if result.is_contiguous() else result.reshape(
                -1, result.shape[-1])
            if result.dtype != dtype:  # e.g. bf16 base output + fp32 adapter: PEFT adds in fp32, then casts back
                return (flat_result + torch.mm(xa, b.t()).mul_(scale)).to(result.dtype).view(result.shape)
            if result.is_contiguous() and not (result.is_leaf and result.requires_grad):
                # The base layer's fresh output is the sum's storage: no copy of it (addmm copies its first argument).
                # Marked dirty, so autograd refuses (never silently miscomputes) a graph that saved it for backward.
                flat_result.addmm_(xa, b.t(), alpha=scale)
                ctx.mark_dirty(result)
                return result
            return torch.addmm(flat_result, xa, b.t(), alpha=scale).view(result.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        flat_x, drop, xa, weight_a, weight_b = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(grad_out.device.type, enabled=False):
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            grad = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
            grad_result = grad_out if ctx.needs_input_grad[0] else None
            grad_x = grad_a = grad_b = None
            # Products with a side of width r are laid out so that the wide operand is the right-hand one, read row by
            # row: ``grad @ weight_b`` and ``grad.T @ xa`` run 2.5-4x slower on CPU (skinny-GEMM kernels) than these.
            grad_xa = (b.t() @ grad.t()).t().mul_(ctx.scale)  # (tokens, r), a transposed view
            if ctx.needs_input_grad[3]:
                grad_b = (xa.t() @ grad).mul_(ctx.scale).t().contiguous().to(weight_b.dtype)
            if ctx.needs_input_grad[2]:
                grad_a = (grad_xa.t() @ _branch_input(drop, flat_x, dtype)).to(weight_a.dtype)
            if ctx.needs_input_grad[1]:
                grad_x = grad_xa @ a
                if drop is not None:  # in place: grad_x is a fresh product
                    _mask_in_place(drop, grad_x)
                grad_x = grad_x.view(ctx.x_shape).to(flat_x.dtype)
        return grad_result, grad_x, grad_a, grad_b, None, None, None


def _branch_input(drop: torch.Tensor | None, flat_x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dropped input in ``dtype`` for an immediate matmul (a scratch buffer when no cast is needed)."""
    if flat_x.dtype == dtype:
        return flat_x if drop is None else _dropped(drop, flat_x)
    if drop is None:
        return flat_x.to(dtype)
    if drop.dtype != torch.bool:
        return _mask_in_place(drop, flat_x.to(dtype))
    return _masked_into(torch.empty(flat_x.shape, dtype=dtype, device=flat_x.device), drop, flat_x)


class FusedLoraLinear(lora_layer.Linear):
    """PEFT's ``lora.Linear`` whose vanilla single-adapter forward runs through :class:`LoraBranch`."""

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        name = active[0]
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if lora_a.bias is not None or lora_b.bias is not None or not isinstance(dropout, (torch.nn.Dropout,
                                                                                              torch.nn.Identity)):
            return None
        if lora_a.weight.dtype != lora_b.weight.dtype or not x.is_floating_point() or x.shape[-1] != lora_a.in_features:
            return None
        if isinstance(dropout, torch.nn.Dropout) and dropout.p > SPARSE_MAX_P:
            try:
                keep_threshold(dropout.p)
            except ValueError:  # p within 2**-17 of 1: not representable by the 16-bit threshold
                return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        dropout = self.lora_dropout[name]
        p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        weight_a = self.lora_A[name].weight
        return LoraBranch.apply(result, x, weight_a, self.lora_B[name].weight, float(self.scaling[name]), p,
                                branch_dtype(x, weight_a))


def fusion_problem() -> str | None:
    """Why the fused branch cannot be used in this run (None = it can)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return "ZeRO-3 gathers LoRA weights only inside their own modules' forward"
    return None


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Switch every plain PEFT ``lora.Linear`` of ``model`` to :class:`FusedLoraLinear`; returns how many."""
    problem = fusion_problem()
    if problem:
        logger.info("fused LoRA branch off: %s", problem)
        return 0
    count = 0
    for module in model.modules():
        if type(module) is lora_layer.Linear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count


def unfuse_lora_layers(model: torch.nn.Module) -> int:
    """Back to PEFT's own ``lora.Linear`` (e.g. before handing the model to code that checks exact types)."""
    count = 0
    for module in model.modules():
        if type(module) is FusedLoraLinear:
            module.__class__ = lora_layer.Linear
            count += 1
    return count
