"""LongLoRA's shifted sparse attention (S2-Attn, ``--shift_attn``), registered as a transformers attention function.

During training each sequence of length L is split into groups of ``G = ceil(ratio * L)`` tokens and attention runs
inside each group only (cost L*G instead of L^2). Half of the heads see groups shifted by G/2, so information flows
between neighbouring groups. In eval mode (``model.eval()``: evaluation, generation, inference) the model attends over
the full sequence with plain sdpa, as LongLoRA prescribes.

It is registered through transformers' ``AttentionInterface`` (no modeling file is patched): the model runs with
``attn_implementation="s2_sdpa"`` and the usual sdpa masks, so padding and packed sequences (block masks built from
``position_ids``) are honoured inside every group.

One deliberate difference from the reference code: the shifted heads roll the sequence, so their last group holds the
last G/2 tokens followed by the first G/2. The reference applies a plain causal mask there, which lets the first tokens
attend to the last ones (future tokens). Here every group is masked by the tokens' original positions, so attention
is strictly causal.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .fused_lora import branch_dtype

S2_ATTENTION = "s2_sdpa"
# Decoder families whose attention modules call the attention interface with (batch, heads, seq, dim) tensors.
S2_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe")


def group_size(seq_len: int, ratio: float) -> int:
    """Tokens per group for a sequence of ``seq_len`` tokens: ``ceil(ratio * seq_len)``, at least 1."""
    return max(1, min(seq_len, math.ceil(ratio * seq_len)))


def group_orders(seq_len: int, size: int, shifted: bool, device: torch.device) -> torch.Tensor:
    """Original token index at each slot of the groups, shape (n_groups, size); indexes >= seq_len are padding.

    Unshifted groups are consecutive; shifted ones start G/2 tokens later and the last one wraps around.
    """
    n_groups = math.ceil(seq_len / size)
    order = torch.arange(n_groups * size, device=device)
    if shifted:
        order = order.roll(-(size // 2))
    return order.view(n_groups, size)


def _allowed(order: torch.Tensor, seq_len: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean mask (batch or 1, n_groups, G, G): key k visible to query q inside each group."""
    q_pos, k_pos = order[:, :, None], order[:, None, :]
    allowed = (k_pos <= q_pos) & (k_pos < seq_len)  # causal by original position; padding keys hidden
    allowed = allowed[None]
    if attention_mask is not None:
        mask = attention_mask[:, 0]
        if mask.dtype != torch.bool:  # additive float mask: 0 = visible
            mask = mask == 0
        padded = order.numel()
        if padded > seq_len:
            mask = F.pad(mask, (0, padded - seq_len, 0, padded - seq_len), value=False)
        allowed = allowed & mask[:, q_pos, k_pos]
    # A query that sees nothing (a padding slot or padding token) sees itself, so softmax never divides by zero.
    eye = torch.eye(order.shape[1], dtype=torch.bool, device=order.device)
    return allowed | (~allowed.any(-1, keepdim=True) & eye)


def _grouped_attention(query, key, value, order, seq_len, attention_mask, dropout, scaling):
    """Attention of (B, h, Lp, D) tensors inside the groups given by ``order``; output in original token order."""
    batch, heads, _, dim = query.shape
    n_groups, size = order.shape
    flat = order.reshape(-1)

    def to_groups(x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, flat].view(batch, heads, n_groups, size, x.shape[-1])
        return x.transpose(1, 2).reshape(batch * n_groups, heads, size, x.shape[-1])

    allowed = _allowed(order, seq_len, attention_mask).expand(batch, -1, -1, -1)
    out = F.scaled_dot_product_attention(
        to_groups(query), to_groups(key), to_groups(value),
        attn_mask=allowed.reshape(batch * n_groups, 1, size, size), dropout_p=dropout, scale=scaling,
    )
    out = out.view(batch, n_groups, heads, size, dim).transpose(1, 2).reshape(batch, heads, n_groups * size, dim)
    return out[:, :, torch.argsort(flat)]


def s2_attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """S2-Attn in training, plain sdpa otherwise. Tensors are (batch, heads, seq, head_dim); returns (B, L, H, D)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    ratio = getattr(module, "shift_attn_ratio", None)
    seq_len = query.shape[2]
    if not module.training or ratio is None or seq_len != key.shape[2] or seq_len < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    heads = query.shape[1]
    key = repeat_kv(key, heads // key.shape[1])
    value = repeat_kv(value, heads // value.shape[1])
    size = group_size(seq_len, ratio)
    padded = math.ceil(seq_len / size) * size
    if padded > seq_len:
        query, key, value = (F.pad(x, (0, 0, 0, padded - seq_len)) for x in (query, key, value))
    half = heads // 2  # heads [half:] see shifted groups, as in LongLoRA
    outputs = []
    for sl, shifted in ((slice(0, half), False), (slice(half, heads), True)):
        if sl.start == sl.stop:
            continue
        order = group_orders(seq_len, size, shifted, query.device)
        outputs.append(_grouped_attention(query[:, sl], key[:, sl], value[:, sl], order, seq_len, attention_mask,
                                          dropout, scaling))
    out = torch.cat(outputs, dim=1)[:, :, :seq_len]
    return out.transpose(1, 2).contiguous(), None


def register_s2_attention() -> str:
    """Register ``s2_sdpa`` (attention function + sdpa masks) with transformers; idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(S2_ATTENTION, s2_attention_forward)
    AttentionMaskInterface.register(S2_ATTENTION, sdpa_mask)
    return S2_ATTENTION


def enable_shift_attn(model: Any, ratio: float) -> int:
    """Switch ``model`` (before LoRA wrapping) to S2-Attn with group ``ratio``; returns the number of attention layers.

    Refuses models outside the Llama/Qwen2 families and attention kernels other than sdpa (FlashAttention-2 runs the
    whole sequence; S2-Attn brings its own grouping).
    """
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"--shift_attn_ratio must be in (0, 1], got {ratio}.")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in S2_MODEL_TYPES:
        raise ConfigError(f"--shift_attn supports {', '.join(S2_MODEL_TYPES)} models; this one is {model_type!r}.")
    current = getattr(model.config, "_attn_implementation", None)
    if current not in ("sdpa", "eager", S2_ATTENTION):
        raise ConfigError(f"--shift_attn runs on sdpa; drop --attn_implementation {current}.")
    model.set_attn_implementation(register_s2_attention())
    count = 0
    for module in model.modules():
        if hasattr(module, "o_proj") and hasattr(module, "q_proj"):
            module.shift_attn_ratio = ratio
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------------
# Per-sequence attention for packed rows


VARLEN_ATTENTION = "varlen_sdpa"


def packed_segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(start, end) of each sequence in every row, split where ``position_ids`` do not go up by one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    width = position_ids.shape[1]
    rows = []
    for row in starts.tolist():
        cuts = [i for i, start in enumerate(row) if start] + [width]
        rows.append(list(zip(cuts[:-1], cuts[1:])))
    return rows


# A segment of a row: queries [start, end) attend causally to themselves and, before them, to the keys
# [prefix_start, prefix_start + prefix_len) of the same row (a prompt shared with an earlier segment, see
# medtrain.shared_prompt). Segments found from position_ids have no prefix.
Segment = tuple[int, int, int, int]  # (start, end, prefix_start, prefix_len)
SEGMENTS_KWARG = "medtrain_segments"


def varlen_attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    position_ids: torch.Tensor | None = None, medtrain_segments: list[list[Segment]] | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal sdpa run separately on each packed sequence of each row (like FlashAttention's varlen kernels).

    A packed row of sequences of lengths l_i then costs sum(l_i^2 / 2) instead of L^2 with a block mask, and no
    (batch, L, L) mask is read. The sequence boundaries are taken from ``position_ids`` alone, as transformers does
    for FlashAttention, so this path runs in training mode only, where rows come from our packing collator without
    a padding mask. Everything else (rows without restarting positions, evaluation, generation with left padding)
    goes to plain sdpa with the usual mask, which honours packed rows too.

    ``medtrain_segments`` (passed through the model's forward kwargs, one list of :data:`Segment` per row) gives the
    layout explicitly, in any mode: DPO's shared-prompt rows (:mod:`medtrain.shared_prompt`), where a reply segment
    also attends to a prompt stored once earlier in the row.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seq_len = query.shape[2]
    segments = medtrain_segments
    if (segments is None and module.training and position_ids is not None and seq_len > 1
            and key.shape[2] == seq_len and position_ids.shape[-1] == seq_len):
        segments = [[(s, e, s, 0) for s, e in row] for row in packed_segments(position_ids.expand(query.shape[0], -1))]
        # Rows of one sequence each: one causal sdpa call over the batch does the same work, unless the rows run as
        # bf16 matmuls; those ignore masks, so only when transformers needed none (no padding: plain causal rows).
        if all(len(row) == 1 for row in segments) and not (
                attention_mask is None and _matmul_attention_applies(query, seq_len, dropout)):
            segments = None
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    # enable_gqa reads the shared key/value heads in place: no repeated copies kept for backward. Rows are taken with
    # unbind and cut into pieces with split, and the output is joined with one cat: the backward of each is one
    # stack/cat of the gradients. (Each slice of the inputs costs a zero-filled full-size gradient and an add in
    # backward; each slice assignment into an empty output clones the whole gradient: 1 GB of copies per SFT bench
    # step.)
    gqa = query.shape[1] != key.shape[1]
    pieces = []
    for q_row, k_row, v_row, row in zip(query.unbind(0), key.unbind(0), value.unbind(0), segments):
        cuts = sorted({0, seq_len}.union(*((s, e, p, p + n) for s, e, p, n in row)))
        qs, ks, vs = (_split_at(x, cuts) for x in (q_row, k_row, v_row))
        pieces += [_segment_attention(qs, ks, vs, segment, dropout, scaling, gqa)[0].transpose(0, 1)  # (l, H, D)
                   for segment in row]
    out = torch.cat(pieces).view(query.shape[0], seq_len, query.shape[1], value.shape[-1])  # (B, L, H, D)
    return out, None


class _Pieces(dict):
    """The pieces of one row's (heads, length, dim) tensor cut at sorted positions: {start: piece}, plus ``span``."""

    def span(self, start: int, end: int) -> torch.Tensor:
        """Positions [start, end) as a (1, heads, end - start, dim) tensor (a view when they are one piece)."""
        parts = []
        while start < end:
            parts.append(self[start])
            start += parts[-1].shape[1]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).unsqueeze(0)


def _split_at(row: torch.Tensor, cuts: list[int]) -> _Pieces:
    sizes = [end - start for start, end in zip(cuts[:-1], cuts[1:])]
    return _Pieces(zip(cuts[:-1], row.split(sizes, dim=1)))


# bf16 segments with at most this many keys run as batched matmuls around a softmax (:func:`_matmul_attention`): on
# CPU, torch's flash kernel is slow in bf16 (its backward is slower than in fp32), while bmm runs at the bf16 matmul
# rate. Measured forward + backward of one causal segment against sdpa's flash kernel (SmolLM2 heads, bf16, 1 thread,
# AMD EPYC with AVX512-BF16, query blocks as below): 2.5-3.3x faster at 48-160 keys, 1.6x at 256, 1.8x at 512, 1.3x
# at 768, 1.1x at 1024, 0.97x at 1536. The limit also bounds what the matmul path keeps for backward (the
# probabilities, about half of heads x length^2 x 2 bytes: 2.4 MB per layer for a 512-token segment of a 9-head
# model), where flash keeps only its output. Above it, in fp32 (flash is 1.2-1.3x faster there) and in fp16 (1.4-3x)
# the flash kernel runs.
MATMUL_ATTENTION_MAX_KEYS = 512


def _segment_attention(query: _Pieces, key: _Pieces, value: _Pieces, segment: Segment, dropout: float,
                       scaling: float | None, gqa: bool) -> torch.Tensor:
    """Attention of one segment's queries: causal within the segment, after its shared prefix (if any)."""
    start, end, prefix_start, prefix_len = segment
    q, k, v = query.span(start, end), key.span(start, end), value.span(start, end)
    if prefix_len:
        prefix = (prefix_start, prefix_start + prefix_len)
        k, v = torch.cat([key.span(*prefix), k], dim=2), torch.cat([value.span(*prefix), v], dim=2)
    if _matmul_attention_applies(q, k.shape[2], dropout):
        return _matmul_attention(q, k, v, scaling)
    if prefix_len == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=end - start > 1,
                                              enable_gqa=gqa)
    # query i sits after the whole prefix: it sees keys 0 .. prefix_len + i (the causal mask aligned bottom-right)
    allowed = torch.ones(end - start, prefix_len + end - start, dtype=torch.bool, device=q.device).tril(prefix_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling,
                                          enable_gqa=gqa)


def _matmul_attention_applies(q: torch.Tensor, keys: int, dropout: float) -> bool:
    """A CPU segment whose attention computes in bf16 (bf16 inputs, or any inputs under bf16 autocast: fp32 weights
    with ``--bf16 True`` leave the queries fp32 after the rotary embedding, and autocast lowers sdpa to bf16), without
    dropout and with at most :data:`MATMUL_ATTENTION_MAX_KEYS` keys. The dtype rule is the fused LoRA branch's."""
    return (q.device.type == "cpu" and branch_dtype(q, q) == torch.bfloat16 and dropout == 0.0
            and keys <= MATMUL_ATTENTION_MAX_KEYS)


# The matmul path computes the scores of at most this many (head, query, key) triples at once: longer segments are cut
# into blocks of queries, each against the keys it can see (the causal mask then skips most of the masked half) and
# with its scores small enough to stay in a core's cache (1 MB in bf16). Measured forward + backward of one segment
# (SmolLM2 heads, bf16, 1 thread, AMD EPYC, best of 3): 256 tokens 6.2 -> 4.1 ms, 384: 12.7 -> 7.6 ms, 512: 23.9 ->
# 13.0 ms; outputs bit-identical (every query's scores and softmax are the same numbers).
SCORES_PER_BLOCK = 1 << 19


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None,
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Causal attention of (1, H, lq, D) queries over (1, KV, lk, D) keys/values (lk >= lq; query i sees keys up to
    lk - lq + i, i.e. the causal mask aligned bottom-right), in ``dtype``, as bmm -> softmax -> bmm; returns
    (1, H, lq, D). Queries go in blocks of at most :data:`SCORES_PER_BLOCK` scores, each over the keys it sees.

    The numerics of transformers' eager attention under bf16 autocast: scores and probabilities rounded to the input
    dtype, softmax accumulated in fp32 by torch's kernel. The query heads that share a key/value head (GQA) are
    stacked into one matrix per key/value head, so the keys are read in place, never repeated. Autocast is off inside
    and the inputs are cast explicitly (autocast would run the softmax in fp32 and cast its output back for the next
    bmm).
    """
    heads, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    blocks = math.ceil(heads * lq * lk / SCORES_PER_BLOCK)
    if blocks <= 1:
        return _matmul_attention_block(q, k, v, scaling, dtype)
    size, prefix = math.ceil(lq / blocks), lk - lq
    return torch.cat([
        _matmul_attention_block(q[:, :, start:start + size], k[:, :, :prefix + start + size],
                                v[:, :, :prefix + start + size], scaling, dtype)
        for start in range(0, lq, size)
    ], dim=2)


def _matmul_attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None,
                            dtype: torch.dtype) -> torch.Tensor:
    """:func:`_matmul_attention` of one block of queries: all of its scores at once."""
    heads, lq, dim = q.shape[1], q.shape[2], q.shape[3]
    kv_heads, lk = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    with torch.autocast(q.device.type, enabled=False):
        hidden = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu_(lk - lq + 1)
        mask = torch.zeros(lq, lk, dtype=dtype, device=q.device).masked_fill_(hidden, float("-inf")).repeat(group, 1)
        # (KV, g*lq, lk) scores: the scale and the mask are folded into the one matmul
        scores = torch.baddbmm(mask, q[0].to(dtype).reshape(kv_heads, group * lq, dim),
                               k[0].to(dtype).transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, v[0].to(dtype)).view(1, heads, lq, v.shape[-1])


def register_varlen_attention() -> str:
    """Register ``varlen_sdpa`` (attention function + sdpa masks) with transformers; idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    return VARLEN_ATTENTION
