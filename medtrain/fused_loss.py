"""A causal-LM loss that projects only the supervised positions through the LM head, in chunks (SFT, CPU-friendly).

The standard loss builds (batch, length, vocab) logits for every position -- 400 MB in fp32 for 4 x 512 tokens and a
49k vocabulary, plus as much again for the softmax and its gradient -- although positions whose next-token label is
-100 (prompts, padding) never reach the loss. Here the backbone's last hidden state is taken from the model, the
supervised positions are selected, and :class:`LinearCrossEntropy` computes the loss *and its gradient* chunk by
chunk during the forward pass, keeping only the (tokens, hidden) gradient. Same loss and gradients, two LM-head
matmuls over supervised tokens instead of two over all tokens, no (tokens, vocab) tensor kept for backward.

TRL's own fused head does the selection on Triton devices only; on CPU it scores every position and recomputes the
logits in backward.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from trl import SFTTrainer

from .modeling import last_positions
from .scratch import scratch
from .tokenization import IGNORE_INDEX

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 512


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, plus (correct, entropy) sums.

    The gradients are computed in the forward pass, one chunk of tokens at a time, so the logits of a chunk are freed
    before the next one is built. Only ``hidden`` (and, when it requires grad, ``weight``/``bias``) get gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, with_grad: bool, chunk: int = CHUNK_TOKENS,
                dtype: torch.dtype | None = None):
        dtype = dtype or torch.promote_types(hidden.dtype, weight.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            return LinearCrossEntropy._chunks(ctx, hidden, weight, bias, targets, with_grad, chunk, dtype)

    @staticmethod
    def _chunks(ctx, hidden, weight, bias, targets, with_grad, chunk, dtype):
        grad_hidden = torch.empty_like(hidden) if with_grad and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grad and ctx.needs_input_grad[1] else None
        grad_bias = (torch.zeros_like(bias, dtype=torch.float32)
                     if with_grad and bias is not None and ctx.needs_input_grad[2] else None)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        entropy = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The LM-head matmuls run in ``dtype`` (bf16 under autocast, as the stock path's lm_head does); the logits are
        # then held in fp32 for the max/exp/log-sum-exp, as transformers' loss upcasts them.
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        # (chunk, vocab) tiles reused by every chunk, and on CPU from call to call (medtrain.scratch): a fresh 100 MB
        # tensor costs more in page faults than the exponentials computed in it.
        tile = (min(chunk, hidden.shape[0]), weight.shape[0])
        logits_tile = scratch("fused_loss.logits", tile, torch.float32, hidden.device)
        probs_tile = scratch("fused_loss.probs", tile, torch.float32, hidden.device)
        low_tile = scratch("fused_loss.low", tile, dtype, hidden.device) if dtype != torch.float32 else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]
            rows = torch.arange(t.shape[0], device=t.device)
            # Few passes over the (chunk, vocab) tile: shift by the max, exponentiate into the softmax in place.
            shifted = logits_tile[:t.shape[0]]
            out = shifted if low_tile is None else low_tile[:t.shape[0]]
            if b is None:
                torch.mm(h, w.t(), out=out)
            else:
                torch.addmm(b, h, w.t(), out=out)
            if low_tile is not None:
                shifted.copy_(out)
            shifted -= shifted.amax(dim=-1, keepdim=True)
            target = shifted[rows, t]
            probs = torch.exp(shifted, out=probs_tile[:t.shape[0]])
            norm = probs.sum(dim=-1)
            probs /= norm[:, None]
            log_norm = torch.log(norm)
            loss += (log_norm - target).sum()
            correct += (target >= 0).sum()  # the target holds the max logit (ties count as hits)
            # sum_v p log p = sum_v p * shifted - log_norm; the shifted logits are not read again, so the product goes
            # into their tile (an einsum over (n, v) runs as n skinny bmm's: 31 vs 11 ms per 512 x 49152 chunk)
            entropy += (log_norm - shifted.mul_(probs).sum(-1)).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            probs[rows, t] -= 1.0  # d(sum CE)/d logits = softmax - one_hot
            low = probs if low_tile is None else low_tile[:t.shape[0]].copy_(probs)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = low @ w
            if grad_weight is not None:
                grad_weight += low.t() @ h
            if grad_bias is not None:
                grad_bias += probs.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct, entropy)
        return loss, correct, entropy

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grads = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)


def loss_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the LM-head matmuls: autocast's when it is on for ``hidden``'s device, else the promoted dtype of
    the operands (what ``F.linear`` would compute in)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, number of argmax hits, summed entropy) over ``targets``; differentiable in the loss only.

    The matmuls run in :func:`loss_dtype` (bf16 under ``torch.autocast("cpu", dtype=torch.bfloat16)``); the
    softmax, log-sum-exp and the sums are fp32 whatever the input dtype.
    """
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, torch.is_grad_enabled(), chunk,
                                    loss_dtype(hidden, weight))


def _unwrap(model: Any) -> Any:
    """The transformers causal LM under PEFT / DDP wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_loss_problem(model: Any, args: Any) -> str | None:
    """Why the fused loss cannot be used for ``model``/``args`` (None = it can)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    base = _unwrap(model)
    config = base.config.get_text_config()
    head = base.get_output_embeddings()
    if getattr(args, "loss_type", "nll") != "nll" or getattr(args, "label_smoothing_factor", 0.0):
        return "a loss other than plain NLL is configured"
    if is_deepspeed_zero3_enabled() or getattr(args, "fsdp", None):
        return "sharded weights (ZeRO-3/FSDP) are gathered only inside the model's forward"
    if not isinstance(head, torch.nn.Linear) or not hasattr(base, getattr(base, "base_model_prefix", "") or "-"):
        return "the model has no plain linear LM head on top of a backbone"
    if any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling",
                                                     "output_multiplier", "lm_head_multiplier")):
        return "the model rescales its logits"
    if "logits_to_keep" not in inspect.signature(type(base).forward).parameters:
        return "the model's forward has no logits_to_keep"
    return None


class EfficientSFTTrainer(SFTTrainer):
    """SFTTrainer with the fused supervised-positions loss (same loss, metrics entropy/mean_token_accuracy/num_tokens).

    Falls back to TRL's loss when :func:`fused_loss_problem` names a reason, when outputs are requested or with
    ``fused_loss=False`` (CUDA runs by default, see :mod:`medtrain.hardware`).
    Batches may carry ``num_real_tokens`` (from :class:`medtrain.efficiency.PackedRowsCollator`) for the token count.
    """

    def __init__(self, *args: Any, fused_loss: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        problem = fused_loss_problem(self.model, self.args) if fused_loss else "our CPU paths are off (--cpu_paths)"
        self._fused = problem is None
        self._hidden: torch.Tensor | None = None
        if problem:
            logger.info("fused supervised-token loss off: %s", problem)
            return
        base = _unwrap(self.model)
        backbone = getattr(base, base.base_model_prefix)
        backbone.register_forward_hook(self._capture_hidden)

    def _capture_hidden(self, module: Any, inputs: Any, output: Any) -> None:
        self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        num_real_tokens = inputs.pop("num_real_tokens", None)
        if return_outputs or not self._fused:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        labels = inputs.pop("labels")
        # the model's own logits are not used: one position, as an index tensor (see last_positions)
        kwargs = dict(inputs, use_cache=False, logits_to_keep=last_positions(labels.shape[1], 1, labels.device))
        if self.aux_loss_enabled:
            kwargs["output_router_logits"] = True
        self._hidden = None
        outputs = model(**kwargs)
        hidden, self._hidden = self._hidden, None
        targets = labels[:, 1:].to(hidden.device)
        mask = targets != IGNORE_INDEX
        head = _unwrap(model).get_output_embeddings()
        with self.accelerator.autocast():  # the mixed precision of the model's forward (--bf16) for the LM head too
            loss_sum, correct, entropy = linear_cross_entropy(hidden[:, :-1][mask], head.weight, head.bias,
                                                              targets[mask])
        num_valid = mask.sum()
        denominator = num_valid if num_items_in_batch is None else num_items_in_batch
        loss = loss_sum / torch.as_tensor(denominator, device=loss_sum.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if self.aux_loss_enabled and outputs.aux_loss is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss.to(loss.device) / steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item())
        # The metrics TRL logs, from the same chunks. TRL's private metric store (_metrics, _total_train_tokens) is the
        # only way to add to what SFTTrainer.log() averages and prints; pinned by tests/test_configuration.py.
        gather = self.accelerator.gather_for_metrics
        valid = gather(num_valid).sum()
        self._metrics[mode]["entropy"].append((gather(entropy.detach()).sum() / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((gather(correct).sum() / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            if num_real_tokens is None:
                mask2d = inputs.get("attention_mask")
                num_real_tokens = int(mask2d.sum()) if mask2d is not None else inputs["input_ids"].numel()
            self._total_train_tokens += int(gather(torch.tensor(num_real_tokens, device=loss.device)).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss
