"""DPO pairs with the prompt computed once and no padding: one row per batch, ``prompt + chosen`` then ``rejected``.

TRL's DPOTrainer runs every pair as two padded rows, ``prompt + chosen`` and ``prompt + rejected``, through the policy
(forward and backward) and through the reference: the prompt twice, and every row padded to the batch's longest. On
the DPO bench pairs (32 pairs of dpo_zh_500, batch 2) that is 23,688 token positions per epoch for 14,471 distinct
tokens. Here a batch becomes one row::

    [prompt_1, chosen_1] [p_1[-1], rejected_1] [prompt_2, chosen_2] [p_2[-1], rejected_2] ...

The rejected segment starts with a copy of the prompt's last token (it predicts the first rejected token), sits at the
positions the rejected reply has in its own row, and attends to the first ``len(prompt) - 1`` tokens of its pair's
prompt, stored once (:func:`medtrain.attention.varlen_attention_forward` with explicit segments). Every token then
sees exactly the context it has in TRL's padded rows, so the log-probs are the same up to rounding, and so are the
gradients: the prompt's activations get the gradients of both replies, as the two copies did.

How it plugs into TRL without replacing its loss: :class:`SharedPromptCollator` returns TRL's padded batch (TRL's loss
and metrics read it) plus the packed row under ``pair_*`` keys, which TRL passes on to the model like any input.
:func:`add_shared_prompt_forward` wraps the model's forward (after TRL's fused LM head): given the ``pair_*`` keys it
runs the packed row and scatters the per-token outputs back into the padded ``(2 * batch, length - 1)`` layout TRL
expects. :func:`shared_prompt_mismatch` checks the whole path on the loaded model before training (a model whose
attention ignores the segments would otherwise train on wrong log-probs) and the trainer falls back to TRL's rows.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .attention import SEGMENTS_KWARG, Segment, register_varlen_attention
from .tokenization import IGNORE_INDEX

logger = logging.getLogger(__name__)

PAIR_KEYS = ("pair_input_ids", "pair_position_ids", "pair_shift_labels", "pair_index", "pair_segments")
# Attention kernels the packed row can run on: they are replaced by the per-segment sdpa function
SUPPORTED_ATTENTION = ("sdpa", "eager", "varlen_sdpa")


def pack_pairs(examples: list[dict[str, list[int]]], width: int) -> dict[str, torch.Tensor]:
    """The packed row of a batch of pairs, for padded rows ``width`` tokens wide (TRL's layout: chosen rows first).

    Returns ``pair_input_ids``/``pair_position_ids``/``pair_shift_labels`` (1, T): the row, each token's position in
    its own padded row, and the token it predicts (-100 for prompt tokens other than the last and for each segment's
    last token); ``pair_index`` (number of predicted tokens,): where each prediction goes in the flattened
    ``(2 * batch, width - 1)`` log-prob layout; ``pair_segments`` (segments, 4): :data:`medtrain.attention.Segment`.
    """
    batch = len(examples)
    ids: list[int] = []
    positions: list[int] = []
    shift_labels: list[int] = []
    index: list[int] = []
    segments: list[Segment] = []
    columns = width - 1
    for i, example in enumerate(examples):
        prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
        if not prompt or not chosen or not rejected:
            raise ValueError("a preference pair needs a prompt and two non-empty replies")
        if len(prompt) + max(len(chosen), len(rejected)) > width:
            raise ValueError(f"pair {i} is {len(prompt) + max(len(chosen), len(rejected))} tokens, wider than the "
                             f"padded batch ({width}): the padded rows were truncated, the packed row would not be")
        start = len(ids)
        # prompt + chosen, as row i: the prediction at column j is of token j + 1
        root = prompt + chosen
        ids += root
        positions += range(len(root))
        for j in range(len(root)):
            predicts = j + 1 >= len(prompt) and j + 1 < len(root)
            shift_labels.append(root[j + 1] if predicts else IGNORE_INDEX)
            if predicts:
                index.append(i * columns + j)
        segments.append((start, start + len(root), start, 0))
        # prompt[-1] + rejected, as row batch + i from column len(prompt) - 1, after the rest of the prompt
        branch_start = len(ids)
        branch = prompt[-1:] + rejected
        ids += branch
        positions += range(len(prompt) - 1, len(prompt) - 1 + len(branch))
        for k in range(len(branch)):
            predicts = k + 1 < len(branch)
            shift_labels.append(branch[k + 1] if predicts else IGNORE_INDEX)
            if predicts:
                index.append((batch + i) * columns + len(prompt) - 1 + k)
        segments.append((branch_start, branch_start + len(branch), start, len(prompt) - 1))
    return {
        "pair_input_ids": torch.tensor([ids]),
        "pair_position_ids": torch.tensor([positions]),
        "pair_shift_labels": torch.tensor([shift_labels]),
        "pair_index": torch.tensor(index),
        "pair_segments": torch.tensor(segments),
    }


@dataclass
class SharedPromptCollator:
    """TRL's padded preference batch (``padded``: its own collator, unchanged) plus the packed row of :func:`pack_pairs`."""

    padded: Callable[[list[dict]], dict[str, torch.Tensor]]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.padded(examples)
        batch.update(pack_pairs(examples, batch["input_ids"].shape[1]))
        return batch


def add_shared_prompt_forward(model: Any) -> None:
    """Wrap ``model.forward`` (a causal LM whose forward TRL's ``add_fused_lm_head`` patched) for packed pairs.

    Called with ``fused_lm_head=True`` and the ``pair_*`` keys: runs the packed row (``pair_segments`` reach the
    attention function) and returns TRL's ``FusedCausalLMOutput`` with every per-token field scattered into the
    padded layout of ``labels`` (zeros elsewhere, as TRL's own head leaves them). Without them (or without
    ``fused_lm_head``): the padded batch through the wrapped forward, the ``pair_*`` keys dropped.
    """
    fused_forward = model.forward

    def forward(self, *args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        pair = {key: kwargs.pop(key, None) for key in PAIR_KEYS}
        if pair["pair_input_ids"] is None or not fused_lm_head:
            return fused_forward(*args, fused_lm_head=fused_lm_head, **kwargs)
        labels = kwargs.pop("labels")
        for key in ("input_ids", "attention_mask", "position_ids", "shift_labels"):
            kwargs.pop(key, None)
        shift_labels = pair["pair_shift_labels"]
        out = fused_forward(input_ids=pair["pair_input_ids"], position_ids=pair["pair_position_ids"],
                            shift_labels=shift_labels, fused_lm_head=True,
                            **{SEGMENTS_KWARG: [[tuple(s) for s in pair["pair_segments"].tolist()]]}, **kwargs)
        valid = shift_labels[0] != IGNORE_INDEX
        shape = (labels.shape[0], labels.shape[1] - 1)

        def scatter(values: torch.Tensor | None) -> torch.Tensor | None:
            if values is None:
                return None
            flat = values.new_zeros(shape[0] * shape[1])
            return flat.index_copy(0, pair["pair_index"], values[0][valid]).view(shape)

        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
            if getattr(out, name, None) is not None:
                setattr(out, name, scatter(getattr(out, name)))
        return out

    model.forward = types.MethodType(forward, model)


def use_segment_attention(model: Any) -> str | None:
    """Switch ``model`` to the per-segment attention function; None if its attention kernel cannot be switched."""
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in SUPPORTED_ATTENTION:
        return None
    if attention != "varlen_sdpa":
        model.set_attn_implementation(register_varlen_attention())
    return model.config._attn_implementation


def shared_prompt_mismatch(model: Any, collator: SharedPromptCollator, vocab_size: int) -> float:
    """Largest |log-prob| difference between TRL's padded rows and the packed row on two synthetic pairs.

    Runs ``model`` (the PEFT wrapper or the causal LM) without gradients, in eval mode (no dropout). Pairs of different
    prompt and reply lengths cover padding, the shared prompt and the reply copies.
    """
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, max(4, vocab_size), (n,), generator=generator).tolist()

    examples = [{"prompt_ids": tokens(5), "chosen_ids": tokens(4), "rejected_ids": tokens(6)},
                {"prompt_ids": tokens(3), "chosen_ids": tokens(7), "rejected_ids": tokens(2)}]
    batch = collator(examples)
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    padded = {key: batch[key] for key in ("input_ids", "attention_mask")}
    packed = {key: batch[key] for key in (*padded, *PAIR_KEYS)}
    training = model.training
    model.eval()  # no dropout: the two layouts must see the same weights
    try:
        with torch.no_grad():
            reference = model(**padded, labels=labels, fused_lm_head=True, use_cache=False).log_probs
            shared = model(**packed, labels=labels, fused_lm_head=True, use_cache=False).log_probs
    finally:
        model.train(training)
    return float((reference.float() - shared.float()).abs().max())
