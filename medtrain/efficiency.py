"""Throughput helpers for SFT: packing without cross-contamination, padding-free batches, NEFTune, token counts.

Packing (``--packing``, on by default in SFT) puts several tokenised conversations into one row of at most
``--model_max_length`` tokens (best-fit decreasing, conversations never split). Rows carry ``position_ids`` that
restart at 0 for every conversation and no ``attention_mask``: transformers 5 then builds a block-diagonal causal
mask from the ``position_ids`` for sdpa/eager/flex attention, so no token attends across conversations. On sdpa the
rows are trained with :func:`medtrain.attention.varlen_attention_forward`, which attends per conversation (cost
sum(l_i^2) instead of the row's L^2). Rows stay at the model length: TRL's packing puts a whole batch into one
batch*length row, whose attention costs batch-times more on CPU. FlashAttention-2 honours ``position_ids`` only for
a single row, so with it the batch is flattened into one padding-free row (its varlen kernels cost nothing extra).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from .attention import register_varlen_attention
from .errors import ConfigError
from .modeling import embedding_rows
from .tokenization import IGNORE_INDEX

logger = logging.getLogger(__name__)

PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "s2_sdpa", "varlen_sdpa")


# ---------------------------------------------------------------------------------------------------------------------
# Packing


def pack_sequences(dataset: Any, max_length: int) -> Any:
    """Pack a dataset of ``input_ids``/``labels`` into rows of at most ``max_length`` tokens (best-fit decreasing).

    Each row gets ``seq_lengths``, the lengths of the conversations it holds, in order. Conversations longer than
    ``max_length`` are never produced by our tokenisation (it cuts at turn boundaries), so nothing is split.
    """
    from trl import pack_dataset

    too_long = sum(1 for ids in dataset["input_ids"] if len(ids) > max_length)
    if too_long:
        raise ConfigError(f"{too_long} sample(s) are longer than {max_length} tokens; cannot pack them unsplit.")
    packed = pack_dataset(dataset.select_columns(["input_ids", "labels"]), max_length, strategy="bfd")
    logger.info("packed %d conversations into %d rows of at most %d tokens (%.1f%% filled)", len(dataset),
                len(packed), max_length, 100 * sum(map(len, packed["input_ids"])) / max(1, len(packed) * max_length))
    return packed


def packed_position_ids(seq_lengths: list[int]) -> list[int]:
    """Positions that restart at 0 for every packed sequence: [3, 2] -> [0, 1, 2, 0, 1]."""
    return [pos for length in seq_lengths for pos in range(length)]


@dataclass
class PackedRowsCollator:
    """Batches packed rows: ``position_ids`` restart per conversation and there is no ``attention_mask``.

    Rows are right-padded to the longest row of the batch; the padding of a row forms one more sequence (positions
    0, 1, ...) that no real token attends to, labelled -100. The label of each conversation's first token is set to
    -100 as well: after the causal shift it is what the previous conversation's last token would be trained to
    predict. (In an unpacked batch that label is never used, so losses are unchanged.) ``num_real_tokens`` (the
    batch's non-padding tokens) is for the token metrics; :class:`medtrain.fused_loss.EfficientSFTTrainer` removes it.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            ids = example["input_ids"]
            lengths = list(example.get("seq_lengths") or [len(ids)])
            if width > len(ids):
                lengths.append(width - len(ids))  # the padding forms one more sequence, labelled -100
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(example["labels"])
            position_ids[row] = torch.tensor(packed_position_ids(lengths))
        labels[position_ids == 0] = IGNORE_INDEX
        real = sum(len(e["input_ids"]) for e in examples)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_real_tokens": real}


def packing_leak(model: Any) -> float:
    """How much a packed sequence's logits change when the sequence before it changes (0.0 = no leak).

    Runs two tiny forwards in eval mode: rows [A, B] and [A', B] with restarting ``position_ids``. If the model's
    attention honours the sequence boundaries, B's logits are identical in both.
    """

    vocab = embedding_rows(model)
    device = model.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(0, vocab, (n,), generator=generator) for n in (6, 6, 5))
    positions = torch.tensor(packed_position_ids([6, 5]), device=device)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = [model(input_ids=torch.cat([a, second]).to(device)[None], position_ids=positions,
                            use_cache=False).logits[0, 6:].float() for a in (first, other)]
    finally:
        model.train(was_training)
    return float((logits[0] - logits[1]).abs().max() / logits[0].abs().max().clamp(min=1e-6))


def packing_supported(model: Any, attn_implementation: str | None, probe: bool = True) -> tuple[bool, str]:
    """Whether packed rows are exact for ``model``: a known attention kernel and (when ``probe``) a measured no-leak."""
    if attn_implementation not in PACKING_ATTENTION:
        return False, f"attention {attn_implementation!r} is not known to honour packed position_ids"
    if probe:
        leak = packing_leak(model)
        if leak > 1e-4:
            return False, f"the model's attention crosses packed sequences (relative logit change {leak:.2g})"
    return True, "attention stays within each packed sequence"


@dataclass(frozen=True)
class BatchPlan:
    """How SFT batches are built for the loaded model, and what TRL's own batch flags must then say."""

    packed: bool  # our packing: several conversations per row
    flat: bool  # one padding-free row per batch
    attention: str
    neftune: str | None  # None, "transformers" (padded batches) or "per-sequence" (packed rows)
    neft_alpha: float | None
    collator: Any
    callbacks: list

    def describe(self) -> str:
        layout = ("packed rows flattened into one padding-free row" if self.packed and self.flat else
                  "packed rows, sequences kept apart" if self.packed else
                  "padding-free batches" if self.flat else "padded batches")
        return f"{layout}; attention {self.attention}; NEFTune {self.neftune or 'off'}"

    def prepare(self, dataset: Any, max_length: int) -> Any:
        return pack_sequences(dataset, max_length) if self.packed and dataset is not None else dataset

    def trainer_args(self, training_args: Any) -> Any:
        """A copy of the finalised ``training_args`` with TRL's batch flags set to this plan; the original is left
        as parsed. TRL never packs (we pack ourselves); padding-free only for flat batches, whose data is already
        truncated (so no max_length); transformers' NEFTune only for padded batches (packed rows use ours)."""
        args = copy.copy(training_args)
        args.packing = False
        args.padding_free = self.flat
        args.max_length = None if self.flat else training_args.max_length
        args.neftune_noise_alpha = self.neft_alpha if self.neftune == "transformers" else None
        return args


def plan_batches(model: Any, training_args: Any, pad_token_id: int,
                 per_sequence_attention: bool = True) -> BatchPlan:
    """Decide packing / padding-free / attention kernel / NEFTune for SFT from the (finalised) flags and the model.

    ``--packing`` (default on) packs when it is exact for this model (a known attention kernel and a measured
    no-leak probe; under ZeRO-3 the weights are not loaded yet, so the kernel alone decides). With FlashAttention-2
    the batch is flattened into one padding-free row, since its kernels honour ``position_ids`` only for a single
    row; ``--padding_free`` flattens any batch. Packed or flattened rows on sdpa run
    :func:`medtrain.attention.varlen_attention_forward` (attention per sequence). ``training_args`` is only read:
    the trainer gets :meth:`BatchPlan.trainer_args`.
    ``per_sequence_attention=False`` (CUDA runs, see :mod:`medtrain.hardware`) keeps transformers' sdpa,
    which honours packed rows through a block mask.
    """
    attention = model.config._attn_implementation
    packed = bool(training_args.packing)
    if packed or training_args.padding_free:
        ok, why = packing_supported(model, attention, probe=not is_deepspeed_zero3_enabled())
        if not ok and training_args.padding_free:
            raise ConfigError(f"--padding_free puts several sequences in one row, but {why}: drop --padding_free.")
        if not ok:
            logger.warning("packing off: %s; batches are padded instead", why)
            packed = False
    flat = bool(training_args.padding_free) or (packed and attention == "flash_attention_2")
    if (packed or flat) and attention == "sdpa" and per_sequence_attention:
        model.set_attn_implementation(register_varlen_attention())
        attention = model.config._attn_implementation
    collator = PackedRowsCollator(pad_token_id, training_args.pad_to_multiple_of) if packed and not flat else None
    neft_alpha = training_args.neftune_noise_alpha
    neftune, callbacks = None, []
    if neft_alpha:
        if packed or flat:
            neftune, callbacks = "per-sequence", [NEFTuneCallback(neft_alpha)]
        else:
            neftune = "transformers"
    return BatchPlan(packed, flat, attention, neftune, neft_alpha, collator, callbacks)


# ---------------------------------------------------------------------------------------------------------------------
# NEFTune


class PackedNEFTune:
    """NEFTune for packed rows: noise ``U(-1, 1) * alpha / sqrt(L * d)`` where L is each conversation's own length.

    transformers' ``neftune_noise_alpha`` takes L from the tensor width (``embeds.size(1)``), which is what the
    published code does for padded batches. In a packed row that width spans several conversations, which would
    shrink the noise; here L comes from the ``position_ids`` segments instead. Noise is added only while the embedding
    module is in training mode, never in eval mode (evaluation, generation).
    """

    def __init__(self, model: Any, alpha: float) -> None:
        self.alpha = alpha
        self._position_ids: torch.Tensor | None = None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone = getattr(base, base.base_model_prefix, base)
        self._handles = [
            backbone.register_forward_pre_hook(self._capture, with_kwargs=True),
            base.get_input_embeddings().register_forward_hook(self._add_noise),
        ]

    def _capture(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._position_ids = kwargs.get("position_ids")

    def _add_noise(self, module: Any, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        lengths = sequence_lengths(self._position_ids, output.shape[:2], output.device)
        scale = self.alpha / torch.sqrt(lengths.to(output.dtype) * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-1, 1) * scale[..., None]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def sequence_lengths(position_ids: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Per-token length of the sequence it belongs to, shape (batch, width); the row width without position_ids."""
    if position_ids is None or position_ids.shape[-1] != shape[1]:
        return torch.full(shape, shape[1], device=device)
    position_ids = position_ids.expand(shape[0], -1).to(device)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    segment = starts.flatten().cumsum(0) - 1  # a global id per sequence, rows never share one
    counts = torch.bincount(segment)
    return counts[segment].view(shape)


class NEFTuneCallback(TrainerCallback):
    """Applies :class:`PackedNEFTune` to the trained model from the start to the end of training."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.hook: PackedNEFTune | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.hook = PackedNEFTune(model, self.alpha)

    def on_train_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


# ---------------------------------------------------------------------------------------------------------------------
# Token accounting


def count_tokens(dataset: Any) -> dict[str, int]:
    """Per epoch: ``samples``, ``tokens`` (real, non-padding) and ``supervised_tokens`` (labels != -100)."""
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    supervised = sum(sum(1 for label in labels if label != IGNORE_INDEX) for labels in dataset["labels"])
    return {"samples": len(dataset), "tokens": tokens, "supervised_tokens": supervised}


def token_throughput(tokens: dict[str, int], epochs: float | None, runtime: float) -> dict[str, float]:
    """Train metrics: tokens per epoch and tokens/s over the training loop (``epochs`` may be fractional)."""
    done = epochs or 0.0
    return {
        "train_tokens": tokens["tokens"],
        "train_supervised_tokens": tokens["supervised_tokens"],
        "train_tokens_per_second": round(tokens["tokens"] * done / runtime, 3) if runtime else 0.0,
        "train_supervised_tokens_per_second": round(tokens["supervised_tokens"] * done / runtime, 3) if runtime else 0.0,
    }
