"""PPO trainer for causal language models, built on ``accelerate`` (single process, torchrun/DDP, DeepSpeed ZeRO-2).

One PPO *update* (``global_step``):

1. take the next ``rollout_batch_size`` prompts (per process) from a seeded per-epoch shuffle; left-pad them;
2. sample responses with ``policy.generate`` (temperature/top-k/top-p); cut each response after its first
   stop token and mask the rest;
3. no-grad forward passes: policy logprobs, reference logprobs, per-token values; ``reward_fn`` scores;
4. per-token rewards (KL penalty + score at the last token), GAE advantages (whitened) and returns;
5. ``num_ppo_epochs`` passes over shuffled mini-batches: clipped policy loss + ``vf_coef`` * clipped value loss,
   one AdamW over the policy's trainable parameters and the value model's;
6. update the KL controller, step the LR schedule, log, and save every ``save_steps`` updates.

Reference policy: with a ``peft.PeftModel`` policy and no ``ref_policy``, reference logprobs come from the same
model under ``policy.disable_adapter()`` (no second copy). A full-model policy gets a frozen deep copy made at
construction, i.e. of the weights it was given (the SFT model), also when resuming.

Value model (no extra ``ValueHead`` class): pass a ``*ForSequenceClassification`` model with ``num_labels=1``
(e.g. initialised from the reward model). Its backbone (``base_model_prefix``) runs over the sequence and its
``score`` head, a linear layer, is applied to *every* position's last hidden state, giving one value per token
(TRL's ``get_reward`` does the same). Any other ``nn.Module`` works if
``forward(input_ids=, attention_mask=, position_ids=)`` returns per-token values ``[B, L]`` or ``[B, L, 1]``.
A ``peft.PeftModel`` around either is fine (train the head with ``modules_to_save=["score"]``).

Dropout is switched off in the policy, the reference and the value model (``p = 0`` on every ``nn.Dropout``,
LoRA dropout included, and on attention-dropout rates), as TRL does: the ratio ``pi / pi_old`` and the KL must
compare the same deterministic function, otherwise dropout noise alone makes them differ from 1 and 0.

Checkpoints (every ``save_steps`` updates and at the end), written to ``.tmp-checkpoint-N`` and renamed to
``output_dir/checkpoint-N`` once complete: ``policy/`` (adapter or full model + tokenizer, safetensors),
``value_model/``, ``optimizer.pt`` (or ``deepspeed/`` under DeepSpeed, whose ZeRO state is per rank),
``scheduler.pt``, ``rng_state_<rank>.pth`` and ``trainer_state.json`` (step, data position, KL controller,
log history). ``train(resume_from_checkpoint=...)`` restores all of it: the run continues as if never stopped.

Not supported: DeepSpeed ZeRO-3 (generation would need gathered parameters) and FSDP.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, get_scheduler

from medtrain.checkpoints import latest_complete_checkpoint, write_marker
from medtrain.errors import ConfigError, UserError
from medtrain.modeling import last_positions
from medtrain.resilience import (
    NONFINITE_MODES,
    STOP,
    Diverged,
    Preempted,
    begin_write,
    checkpoint_size,
    diverged_message,
    drop_gradients,
    gradients_finite,
    newest_marked_checkpoint,
    preempted_message,
    tree_size,
    writing,
)
from medtrain.ppo.config import PPOArguments
from medtrain.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    compute_gae,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    per_token_rewards,
    policy_loss,
    truncate_after_stop,
    value_loss,
    whiten,
)

RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
"""``reward_fn(query_ids, response_ids) -> scores [batch]``; responses end with their stop token if they have one."""

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
# Console line: short label -> logged metric (TensorBoard and trainer_state.json get every metric).
CONSOLE_METRICS = {
    "score": "objective/score_mean", "kl": "objective/kl", "kl_coef": "objective/kl_coef",
    "entropy": "policy/entropy", "pg_loss": "loss/policy", "vf_loss": "loss/value",
    "pg_clipfrac": "policy/clipfrac", "vf_clipfrac": "value/clipfrac", "approx_kl": "policy/approx_kl",
    "resp_len": "response/length_mean", "lr": "lr",
}


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional for full-model PPO
        return False
    return isinstance(model, PeftModel)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability in ``model`` to 0 (``nn.Dropout`` modules and attention-dropout floats)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        # HF attention modules pass ``self.attention_dropout`` to the attention kernel in training mode.
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens (left padding gets 0), as ``generate`` computes them."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def token_values(value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token values ``[B, L]`` (float32) of ``value_model``; see the module docstring for what it may be."""
    position_ids = position_ids_from_mask(attention_mask)
    model = value_model.get_base_model() if _is_peft_model(value_model) else value_model
    head = getattr(model, "score", None)
    if isinstance(head, nn.Module):
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        values = head(hidden)
    else:
        values = value_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        values = getattr(values, "logits", values)
    if values.dim() == 3:
        values = values.squeeze(-1)
    return values.float()


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so a single ``accelerator.prepare`` (DDP/DeepSpeed) covers both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, R, V]`` predicting each response token and the values ``[B, R]`` of the states before them."""
        logits = response_logits(self.policy, input_ids, attention_mask, response_length)
        values = token_values(self.value_model, input_ids, attention_mask)[:, -response_length - 1 : -1]
        return logits, values


def response_logits(
    policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
) -> torch.Tensor:
    """Logits at positions ``P-1 .. P+R-2``, which predict the ``R`` response tokens of ``[prompt | response]``."""
    # The LM head only on the last R+1 positions: prompts can be much longer than responses.
    output = policy(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=last_positions(input_ids.shape[1], response_length + 1, input_ids.device),
        use_cache=False,
    )
    return output.logits[:, :-1]


def left_pad(sequences: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)``, as generation with a causal LM needs."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


@dataclass
class Rollout:
    """One rollout batch (this process's share). Response tensors are ``[B, R]``."""

    input_ids: torch.Tensor  # [B, P + R] left-padded prompt + right-padded response
    attention_mask: torch.Tensor  # [B, P + R]
    response_mask: torch.Tensor  # [B, R], 1 up to and including the first stop token
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # [B], after the missing-EOS penalty
    has_stop: torch.Tensor  # [B] bool

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]


@dataclass
class PPOState:
    """Progress saved in ``trainer_state.json``; ``data_epoch``/``data_index`` locate the next prompt batch."""

    global_step: int = 0
    max_steps: int = 0
    data_epoch: int = 0
    data_index: int = 0
    kl_controller: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, float]] = field(default_factory=list)


class PPOTrainer:
    """PPO with a KL penalty to a reference policy, a learned value model and a black-box ``reward_fn``.

    Args:
        policy: causal LM to train, a plain ``PreTrainedModel`` or a ``peft.PeftModel``.
        value_model: per-token value model (see module docstring), trained alongside the policy.
        reward_fn: scores ``(query_ids, response_ids)`` lists -> tensor ``[batch]``.
        tokenizer: used for ``pad_token_id`` and saved next to the policy in checkpoints.
        train_prompts: tokenised prompts (no padding).
        args: :class:`PPOArguments`.
        stop_token_ids: tokens that end a response (e.g. ``<|im_end|>`` and EOS).
        ref_policy: frozen reference; ``None`` means ``disable_adapter()`` for a PeftModel policy and a frozen
            copy of ``policy`` otherwise.
        output_dir: checkpoints, ``trainer_state.json`` and TensorBoard logs (``logs/``).
        max_steps: PPO updates to run; default one pass over ``train_prompts``.
        logging_steps: log the mean of the metrics every N updates.
        save_steps: save a checkpoint every N updates (0: only at the end).
        lr_scheduler_type: any ``transformers.get_scheduler`` name (``linear`` decays to 0 at ``max_steps``).
        accelerator: a configured ``Accelerator``; default ``Accelerator(gradient_accumulation_steps=...)``.
        on_nonfinite: ``stop`` (raise :class:`medtrain.resilience.Diverged` before an update on NaN/inf gradients)
            or ``skip`` (drop that optimizer step: weights and optimizer state unchanged).

    SIGTERM/SIGINT (see :class:`medtrain.resilience.StopRequest`): the current PPO update is finished, every rank
    agrees, a checkpoint is written and :class:`medtrain.resilience.Preempted` is raised (exit status 75).
    """

    def __init__(
        self,
        policy: nn.Module,
        value_model: nn.Module,
        reward_fn: RewardFn,
        tokenizer: Any,
        train_prompts: list[list[int]],
        args: PPOArguments,
        *,
        stop_token_ids: list[int],
        output_dir: str | os.PathLike,
        ref_policy: nn.Module | None = None,
        seed: int = 42,
        learning_rate: float = 1e-5,
        max_steps: int | None = None,
        logging_steps: int = 1,
        save_steps: int = 0,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_scheduler_type: str = "linear",
        max_grad_norm: float | None = 1.0,
        accelerator: Accelerator | None = None,
        on_nonfinite: str = "stop",
    ):
        if ref_policy is policy:
            raise ValueError("ref_policy must not be the policy itself: pass None to get a frozen copy")
        self.args = args
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer
        self.train_prompts = train_prompts
        self.stop_token_ids = list(stop_token_ids)
        self.output_dir = Path(output_dir)
        self.seed, self.logging_steps, self.save_steps = seed, logging_steps, save_steps
        self.max_grad_norm = max_grad_norm
        self.is_peft_policy = _is_peft_model(policy)
        if on_nonfinite not in NONFINITE_MODES:
            raise ConfigError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")
        self.on_nonfinite, self.nonfinite_skipped = on_nonfinite, 0

        n_micro = args.micro_batches_per_mini_batch
        self.accelerator = accelerator or Accelerator(gradient_accumulation_steps=n_micro)
        if self.accelerator.gradient_accumulation_steps != n_micro:
            raise ConfigError(f"the accelerator accumulates {self.accelerator.gradient_accumulation_steps} micro-"
                              f"batches but the PPO mini-batch has {n_micro}: create it with "
                              f"gradient_accumulation_steps={n_micro}")
        self.is_deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None) is not None
        if self.is_deepspeed:
            self._configure_deepspeed()
        self.world_size = self.accelerator.num_processes
        self.global_batch_size = args.rollout_batch_size * self.world_size
        self.pad_token_id = self._pick_pad_token_id(tokenizer)
        self._check_inputs(train_prompts, logging_steps, save_steps, max_steps, value_model)
        self.max_steps = max_steps if max_steps is not None else len(train_prompts) // self.global_batch_size

        # Reference: the adapter-free base model for LoRA; otherwise a frozen copy taken now, before any
        # training or checkpoint loading touches the policy.
        if ref_policy is None and not self.is_peft_policy:
            ref_policy = copy.deepcopy(policy)
        self.ref_policy = ref_policy
        if self.ref_policy is not None:
            self.ref_policy.requires_grad_(False)
            self.ref_policy.eval()
            disable_dropout(self.ref_policy)
            self.ref_policy.to(self.accelerator.device)
        for model in (policy, value_model):
            disable_dropout(model)
            if args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        self.kl_controller: AdaptiveKLController | FixedKLController = (
            AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
            if args.adaptive_kl
            else FixedKLController(args.kl_coef)
        )
        wrapper = PolicyAndValue(policy, value_model)
        params = [p for p in wrapper.parameters() if p.requires_grad]
        # eps=1e-5 as in lm-human-preferences: a larger epsilon damps steps on tiny-gradient parameters.
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, eps=1e-5)
        scheduler = get_scheduler(lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps,
                                  num_training_steps=self.max_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(wrapper, optimizer, scheduler)
        # The schedule advances once per PPO update, not per optimizer step (see train()).
        self.scheduler.step_with_optimizer = False

        self.generation_config = GenerationConfig(
            do_sample=True,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=self.stop_token_ids or None,
            pad_token_id=self.pad_token_id,
            # Neutralise sampling settings a checkpoint's generation_config may carry: PPO needs the sampled
            # distribution to be softmax(logits / temperature), the one whose logprobs it optimises.
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            typical_p=1.0,
            num_beams=1,
            num_return_sequences=1,
        )
        self.state = PPOState(max_steps=self.max_steps)
        self._epoch_order: tuple[int, torch.Tensor] | None = None
        self._writer = None

    # ------------------------------------------------------------------ setup checks
    def _configure_deepspeed(self) -> None:
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin.zero_stage == 3:
            raise ConfigError("DeepSpeed ZeRO-3 is not supported by the PPO trainer (generation would need the "
                              "sharded weights gathered every step): use ZeRO stage 2")
        # Without a DataLoader in prepare(), accelerate cannot fill the "auto" batch sizes itself: PPO's micro-batch,
        # accumulated over one mini-batch, is DeepSpeed's micro-batch and accumulation.
        micro, n_micro = self.args.effective_micro_batch_size, self.args.micro_batches_per_mini_batch
        wanted = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": n_micro,
                  "train_batch_size": micro * n_micro * self.accelerator.num_processes}
        config = plugin.deepspeed_config
        for key, value in wanted.items():
            if config.get(key, "auto") == "auto":
                config[key] = value
            elif config[key] != value:
                raise ConfigError(f"the DeepSpeed config sets {key}={config[key]} but the PPO batch sizes need "
                                  f"{value}: set it to \"auto\"")
        if config.get("gradient_clipping", "auto") == "auto":  # DeepSpeed clips inside its optimizer step
            config["gradient_clipping"] = self.max_grad_norm or 0.0

    def _pick_pad_token_id(self, tokenizer: Any) -> int:
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            raise ConfigError("the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token")
        return int(pad)

    def _check_inputs(self, prompts: list[list[int]], logging_steps: int, save_steps: int,
                      max_steps: int | None, value_model: nn.Module) -> None:
        problems = []
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:
            problems.append(f"train_prompts has {len(empty)} empty prompt(s), first at index {empty[0]}")
        if len(prompts) < self.global_batch_size:
            problems.append(f"{len(prompts)} prompt(s) are fewer than one rollout batch "
                            f"(rollout_batch_size {self.args.rollout_batch_size} x {self.world_size} process(es))")
        if max_steps is not None and max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {max_steps}")
        if logging_steps < 1:
            problems.append(f"logging_steps must be >= 1, got {logging_steps}")
        if save_steps < 0:
            problems.append(f"save_steps must be >= 0 (0: save only at the end), got {save_steps}")
        if self.args.missing_eos_penalty is not None and not self.stop_token_ids:
            problems.append("missing_eos_penalty needs stop_token_ids: without them no response can finish")
        model = value_model.get_base_model() if _is_peft_model(value_model) else value_model
        head = getattr(model, "score", None)
        if isinstance(head, nn.Linear) and head.out_features != 1:
            problems.append(f"the value model's score head has {head.out_features} outputs; load it with "
                            "num_labels=1")
        if problems:
            raise ConfigError(problems)

    # ------------------------------------------------------------------ data
    def _next_prompts(self) -> list[list[int]]:
        """This process's slice of the next global batch; a new seeded shuffle per data epoch, remainder dropped."""
        n = len(self.train_prompts)
        if self.state.data_index + self.global_batch_size > n:
            self.state.data_epoch += 1
            self.state.data_index = 0
        if self._epoch_order is None or self._epoch_order[0] != self.state.data_epoch:
            generator = torch.Generator().manual_seed(self.seed + self.state.data_epoch)
            self._epoch_order = (self.state.data_epoch, torch.randperm(n, generator=generator))
        start = self.state.data_index + self.accelerator.process_index * self.args.rollout_batch_size
        indices = self._epoch_order[1][start : start + self.args.rollout_batch_size].tolist()
        self.state.data_index += self.global_batch_size
        return [list(self.train_prompts[i]) for i in indices]

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def _rollout(self, prompts: list[list[int]]) -> Rollout:
        device = self.accelerator.device
        unwrapped: PolicyAndValue = self.accelerator.unwrap_model(self.model)
        unwrapped.eval()
        query, query_mask = left_pad(prompts, self.pad_token_id, device)
        generated = unwrapped.policy.generate(
            input_ids=query, attention_mask=query_mask, generation_config=self.generation_config
        )
        responses, response_mask, has_stop = truncate_after_stop(
            generated[:, query.shape[1] :], self.stop_token_ids, self.pad_token_id
        )
        input_ids = torch.cat([query, responses], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        length = responses.shape[1]

        chunk = self.args.effective_micro_batch_size
        parts = [self._forward_rollout(unwrapped, input_ids[i : i + chunk], attention_mask[i : i + chunk], length)
                 for i in range(0, len(prompts), chunk)]
        logprobs, ref_logprobs, values = (torch.cat(column) for column in zip(*parts))

        response_lists = [row[: int(n)].tolist() for row, n in zip(responses, response_mask.sum(1))]
        scores = self.reward_fn(prompts, response_lists)
        if not isinstance(scores, torch.Tensor) or scores.shape != (len(prompts),):
            raise ValueError(f"reward_fn must return a tensor of shape ({len(prompts)},), got "
                             f"{getattr(scores, 'shape', type(scores).__name__)}")
        scores = apply_missing_eos_penalty(scores.to(device, torch.float32), has_stop, self.args.missing_eos_penalty)
        return Rollout(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=response_mask,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            scores=scores,
            has_stop=has_stop,
        )

    def _forward_rollout(
        self, unwrapped: PolicyAndValue, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy logprobs, reference logprobs and values ``[b, R]`` of one micro-batch (no grad)."""
        labels = input_ids[:, -length:]
        # Logits are divided by the temperature in fp32: under bf16 autocast the reference's logits come back in
        # bf16 (the policy's are upcast by accelerate's wrapper), and a bf16 division would round them a second time
        # (up to 2**-8 relative, ~0.1 nats on logits of 30): a KL between identical models that is not 0.
        with self.accelerator.autocast():  # the precision of the training forward passes
            logits, values = unwrapped(input_ids, attention_mask, length)
            logprobs = logprobs_from_logits(logits.float() / self.args.temperature, labels)
            del logits
            if self.ref_policy is None:
                with unwrapped.policy.disable_adapter():
                    ref_logits = response_logits(unwrapped.policy, input_ids, attention_mask, length)
            else:
                ref_logits = response_logits(self.ref_policy, input_ids, attention_mask, length)
            ref_logprobs = logprobs_from_logits(ref_logits.float() / self.args.temperature, labels)
        return logprobs, ref_logprobs, values

    # ------------------------------------------------------------------ PPO update
    def _ppo_update(self, rollout: Rollout) -> dict[str, float]:
        args, accelerator = self.args, self.accelerator
        mask = rollout.response_mask.float()
        with torch.no_grad():
            rewards, kl = per_token_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                            self.kl_controller.value, args.kl_estimator)
            enough = mask.sum() > 1  # whitening needs two valid tokens
            if args.whiten_rewards and enough:
                rewards = whiten(rewards, mask, shift_mean=False) * mask
            advantages, returns = compute_gae(rewards, rollout.values * mask, mask, args.gamma, args.lam)
            if enough:
                advantages = whiten(advantages, mask) * mask

        stats: dict[str, list[torch.Tensor]] = {k: [] for k in (
            "loss/policy", "loss/value", "policy/clipfrac", "value/clipfrac", "policy/approx_kl", "policy/entropy")}
        self.model.train()
        batch, micro, length = args.rollout_batch_size, args.effective_micro_batch_size, rollout.response_length
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(batch)
            for mb_start in range(0, batch, args.mini_batch_size):
                mini = order[mb_start : mb_start + args.mini_batch_size]
                for mc_start in range(0, args.mini_batch_size, micro):
                    idx = mini[mc_start : mc_start + micro].to(accelerator.device)
                    with accelerator.accumulate(self.model):
                        logits, values = self.model(rollout.input_ids[idx], rollout.attention_mask[idx], length)
                        logits = logits.float() / args.temperature  # in fp32, as in the rollout
                        labels = rollout.input_ids[idx][:, -length:]
                        new_logprobs = logprobs_from_logits(logits, labels)
                        pg_loss, pg_clipfrac, approx_kl = policy_loss(
                            new_logprobs, rollout.logprobs[idx], advantages[idx], mask[idx], args.cliprange)
                        vf_loss, vf_clipfrac = value_loss(
                            values, rollout.values[idx], returns[idx], mask[idx], args.cliprange_value)
                        accelerator.backward(pg_loss + args.vf_coef * vf_loss)
                        if accelerator.sync_gradients and self.max_grad_norm:
                            accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                        if accelerator.sync_gradients:
                            self._check_gradients()
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    with torch.no_grad():
                        entropy = masked_mean(entropy_from_logits(logits.detach()), mask[idx])
                    for key, value in zip(stats, (pg_loss, vf_loss, pg_clipfrac, vf_clipfrac, approx_kl, entropy)):
                        stats[key].append(value.detach())

        def global_mean(x: torch.Tensor) -> float:
            return accelerator.reduce(x.detach().float().mean(), reduction="mean").item()

        scores = accelerator.gather(rollout.scores)
        seq_kl = kl.sum(1)
        metrics = {
            "objective/score_mean": scores.mean().item(),
            "objective/score_std": scores.std().item() if scores.numel() > 1 else 0.0,
            "objective/kl": global_mean(seq_kl),
            "objective/kl_coef": self.kl_controller.value,
            "objective/rlhf_reward": global_mean(rollout.scores - self.kl_controller.value * seq_kl),
            "response/length_mean": global_mean(rollout.response_mask.sum(1).float()),
            "response/stop_rate": global_mean(rollout.has_stop.float()),
        }
        metrics.update({key: global_mean(torch.stack(values)) for key, values in stats.items()})
        self.kl_controller.update(metrics["objective/kl"], self.global_batch_size)
        return metrics

    def _check_gradients(self) -> None:
        """Non-finite gradients (averaged over ranks by DDP, so every rank decides alike): stop or skip the step."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if gradients_finite(params) is not False:  # None: DeepSpeed keeps the gradients in its own buffers
            return
        step = self.state.global_step + 1
        if self.on_nonfinite == "stop":
            STOP.uninstall()
            losses = [(e["step"], e["loss/policy"]) for e in self.state.log_history
                      if isinstance(e.get("loss/policy"), float) and np.isfinite(e["loss/policy"])]
            raise Diverged(diverged_message(step, "non-finite PPO loss or gradient norm (NaN/inf gradients)",
                                            losses[-1] if losses else None, str(self.output_dir)))
        drop_gradients(params)
        self.nonfinite_skipped += 1
        self._print(f"update {step}: non-finite loss or gradient norm; skipped this optimizer step "
                    f"(--on_nonfinite skip; {self.nonfinite_skipped} skipped so far)")

    # ------------------------------------------------------------------ loop
    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None) -> list[dict[str, float]]:
        """Run PPO up to ``max_steps`` updates; returns the log history.

        ``resume_from_checkpoint``: a ``checkpoint-N`` directory, or ``True`` for the newest one in ``output_dir``.
        """
        if resume_from_checkpoint:
            path = (self._latest_checkpoint() if resume_from_checkpoint is True
                    else Path(resume_from_checkpoint))
            self._load_checkpoint(path)
        else:
            seed = self.seed + self.accelerator.process_index  # distinct samples on every process
            random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a resumed run is about to write again.
            self._writer = SummaryWriter(str(self.output_dir / "logs"), purge_step=self.state.global_step + 1)
            self._print(f"PPO: {self.max_steps} updates x {self.global_batch_size} prompts "
                        f"({self.args.rollout_batch_size} per process x {self.world_size}), "
                        f"{self.args.num_ppo_epochs} epochs x {self.args.num_mini_batches} mini-batches, "
                        f"up to {self.args.max_new_tokens} new tokens; starting at step {self.state.global_step}")

        pending: list[dict[str, float]] = []
        started = time.time()
        STOP.install()
        while self.state.global_step < self.max_steps:
            rollout = self._rollout(self._next_prompts())
            metrics = self._ppo_update(rollout)
            metrics["lr"] = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.state.global_step += 1
            pending.append(metrics)
            step = self.state.global_step
            if step % self.logging_steps == 0 or step == self.max_steps:
                self._log(pending, time.time() - started)
                pending = []
            saved = None
            if (self.save_steps and step % self.save_steps == 0) or step == self.max_steps:
                saved = self._save_checkpoint()
            if STOP.agreed(self.accelerator.device):  # every rank leaves after the same update
                if pending:
                    self._log(pending, time.time() - started)
                saved = saved or self._save_checkpoint()
                if self._writer is not None:
                    self._writer.close()
                STOP.uninstall()
                raise Preempted(preempted_message(STOP.signal_name(), step, str(saved)))
        if self._writer is not None:
            self._writer.close()
        STOP.uninstall()
        previous = newest_marked_checkpoint(str(self.output_dir))
        # what the stage writes next: the final policy, about the size of the last checkpoint's policy/
        begin_write(str(self.output_dir), "final model", tree_size(os.path.join(previous, "policy")) if previous else None)
        return self.state.log_history

    def _log(self, pending: list[dict[str, float]], elapsed: float) -> None:
        entry = {key: sum(m[key] for m in pending) / len(pending) for key in pending[0]}
        entry["epoch"] = self.state.data_epoch + self.state.data_index / len(self.train_prompts)
        entry["step"] = self.state.global_step
        self.state.log_history.append(entry)
        if not self.accelerator.is_main_process:
            return
        for key, value in entry.items():
            if key not in ("step", "epoch"):
                self._writer.add_scalar(key, value, entry["step"])
        self._writer.flush()
        self._write_state(self.output_dir / STATE_FILE)
        self._print(f"step {entry['step']}/{self.max_steps} ({elapsed:.0f}s) "
                    + " ".join(f"{label}={entry[key]:.4g}" for label, key in CONSOLE_METRICS.items()))

    def is_world_process_zero(self) -> bool:
        """True on the process that writes files (transformers.Trainer's name, so stage code treats both alike)."""
        return self.accelerator.is_main_process

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    # ------------------------------------------------------------------ checkpoints
    def _write_state(self, path: Path) -> None:
        self.state.kl_controller = self.kl_controller.state_dict()
        path.write_text(json.dumps(asdict(self.state), indent=2) + "\n")

    def save_model(self, path: str | os.PathLike) -> None:
        """Save the policy (adapter or full model, safetensors) and the tokenizer to ``path`` (main process)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            policy = self.accelerator.unwrap_model(self.model).policy
            policy.save_pretrained(path)
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(path)

    def _save_checkpoint(self) -> Path:
        """Write ``checkpoint-N`` via a temporary directory renamed at the end, so a crash leaves no half checkpoint;
        a failed write (disk full) removes the temporary directory and names the path and the space it needs."""
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        tmp = self.output_dir / f".tmp-{final.name}"
        previous = newest_marked_checkpoint(str(self.output_dir))
        try:
            with writing(str(final), "checkpoint", checkpoint_size(previous)):
                return self._write_checkpoint(final, tmp)
        finally:
            if self.accelerator.is_main_process and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _write_checkpoint(self, final: Path, tmp: Path) -> Path:
        accelerator = self.accelerator
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        self.save_model(tmp / "policy")
        if accelerator.is_main_process:
            value_model = accelerator.unwrap_model(self.model).value_model
            if hasattr(value_model, "save_pretrained"):
                value_model.save_pretrained(tmp / "value_model")
            else:
                (tmp / "value_model").mkdir()
                save_file({k: v.contiguous() for k, v in value_model.state_dict().items()},
                          str(tmp / "value_model" / "model.safetensors"))
            if not self.is_deepspeed:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            self._write_state(tmp / STATE_FILE)
        if self.is_deepspeed:  # ZeRO partitions the optimizer over ranks: every rank writes its part
            self.model.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / f"rng_state_{accelerator.process_index}.pth")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # The marker (with the files' manifest) the other stages' checkpoints carry, so that
            # `--resume_from_checkpoint auto` finds this one too and verifies it.
            write_marker(str(tmp), self.state.global_step)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._print(f"saved {final}")
        accelerator.wait_for_everyone()
        return final

    def _latest_checkpoint(self) -> Path:
        path = latest_complete_checkpoint(str(self.output_dir))
        if path is None:
            raise UserError(f"no complete {CHECKPOINT_PREFIX}N directory in {self.output_dir} to resume from")
        return Path(path)

    def _load_checkpoint(self, path: Path) -> None:
        if not (path / STATE_FILE).is_file():
            raise UserError(f"{path} is not a PPO checkpoint (no {STATE_FILE})")
        state = json.loads((path / STATE_FILE).read_text())
        unwrapped: PolicyAndValue = self.accelerator.unwrap_model(self.model)
        _load_weights(unwrapped.policy, path / "policy")
        _load_weights(unwrapped.value_model, path / "value_model")
        if self.is_deepspeed:  # also restores ZeRO's fp32 master weights, which the weights above do not reach
            self.model.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.state = PPOState(**{**state, "max_steps": self.max_steps})
        self.state.log_history = [e for e in self.state.log_history if e["step"] <= self.state.global_step]
        rng_file = path / f"rng_state_{self.accelerator.process_index}.pth"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)  # our own file: python/numpy RNG states are pickled
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:  # resumed on more processes than saved: fresh, distinct seeds
            torch.manual_seed(self.seed + self.accelerator.process_index + 1000 * self.state.global_step)
        self._print(f"resumed from {path} at step {self.state.global_step} "
                    f"(kl_coef {self.kl_controller.value:.4g}, data epoch {self.state.data_epoch})")


def _load_weights(model: nn.Module, directory: Path) -> None:
    """Load what ``save_pretrained`` wrote to ``directory`` back into ``model`` in place (adapter or full model)."""
    if _is_peft_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise UserError(f"{directory}: adapter weights do not fit the policy: {result.unexpected_keys[:3]}")
        return
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    result = model.load_state_dict(state, strict=False)
    # save_pretrained drops tied weights (lm_head = embeddings): a missing key is fine if it shares storage
    # with a loaded one.
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    missing = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise UserError(f"{directory}: weights do not fit the model (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")
