"""PPO maths for language models: pure tensor functions and KL-coefficient controllers.

Shapes: ``B`` sequences by ``T`` response tokens. ``mask`` is 1 on valid response tokens (up to and
including the stop token) and 0 on padding; masked entries never enter a mean, a variance or a loss.
Token ``t`` of a response is one action; the state before it is the prompt plus tokens ``< t``.

References: Ziegler et al. 2019 (arXiv:1909.08593, openai/lm-human-preferences), Schulman et al. 2017
(PPO, arXiv:1707.06347), GAE (arXiv:1506.02438), and TRL 1.12's ``trl/experimental/ppo``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    """Mean over the entries where ``mask`` is 1: ``sum(x * m) / sum(m)`` (over ``dim``, or all entries)."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries: ``sum(m * (x - mean)^2) / (n - 1)`` with ``n = sum(m)``.

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` like TRL and lm-human-preferences;
    it needs at least two valid entries.
    """
    if mask is None:
        mask = torch.ones_like(x)
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var needs at least 2 valid entries for an unbiased variance, got {int(n)}")
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to zero mean and unit (unbiased) variance over the masked entries.

    ``y = (x - mean) / sqrt(var + 1e-8)``; with ``shift_mean=False`` the mean is added back,
    ``y = (x - mean) / sqrt(var + 1e-8) + mean`` (only the scale changes, as for reward whitening in TRL).
    Masked entries are transformed too; callers zero them if they need to.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label: ``log softmax(logits)[label] = logits[label] - logsumexp(logits)``.

    ``logits`` [B, T, V] (computed in float32), ``labels`` [B, T] -> [B, T]. Gathering before the
    logsumexp avoids materialising a second [B, T, V] tensor of log-probabilities.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position: ``H = logsumexp(l) - sum(softmax(l) * l)``; [B, T, V] -> [B, T]."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Sampled estimate of ``KL(policy || ref)`` per token (http://joschu.net/blog/kl-approx.html).

    With ``log r = ref_logp - logp``: ``k1 = -log r = logp - ref_logp`` (unbiased, can be negative);
    ``k3 = (r - 1) - log r`` (unbiased, always >= 0, lower variance).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of ``mask`` [B, T] -> [B]; every row needs at least one valid token."""
    if bool((mask.sum(1) == 0).any()):
        raise ValueError("every sequence needs at least one valid response token")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values


def per_token_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of Ziegler et al.: a KL penalty on every token plus the score at the end.

    ``r_t = -kl_coef * kl_t`` with ``kl_t`` from :func:`kl_per_token`, and ``r_last += score`` at the last
    valid token of each row (``score`` [B]). Padding gets ``r_t = 0``. Returns ``(rewards, kl)``, both [B, T],
    ``kl`` zero on padding.
    """
    mask = mask.to(logprobs.dtype)
    kl = kl_per_token(logprobs, ref_logprobs, kl_estimator) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_valid_index(mask)] += score.to(rewards.dtype)
    return rewards, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid tokens of each row.

    Backwards over valid tokens: ``delta_t = r_t + gamma * V_next - V_t`` and
    ``A_t = delta_t + gamma * lam * A_next``, where ``next`` is the next *valid* token (``V_next = 0``,
    ``A_next = 0`` after the last one: the episode ends there). Masked tokens are skipped, so they neither
    bootstrap nor pass the advantage on. Returns ``(advantages, returns)`` with ``returns = A + V``;
    both are 0 on padding.
    """
    valid = mask.bool()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(valid[:, t], advantage, 0.0)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss of PPO, averaged over valid tokens.

    ``ratio = exp(logp - old_logp)``; ``loss = mean(max(-A * ratio, -A * clip(ratio, 1 - e, 1 + e)))``.
    Returns ``(loss, clipfrac, approx_kl)``: ``clipfrac`` is the share of valid tokens where the clipped
    term is the larger one (the clip binds), ``approx_kl = mean(0.5 * (logp - old_logp)^2)``.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, averaged over valid tokens.

    ``V_clip = V_old + clip(V - V_old, -c, c)``; ``loss = 0.5 * mean(max((V - R)^2, (V_clip - R)^2))``.
    Returns ``(loss, vf_clipfrac)``, the share of valid tokens where the clipped error is the larger one.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    squared = (values - returns) ** 2
    squared_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(squared, squared_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((squared_clipped > squared).float(), mask)
    return loss, clipfrac


def truncate_after_stop(
    responses: torch.Tensor, stop_token_ids: list[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first stop token.

    Returns ``(responses, mask, has_stop)``: tokens after the first stop token become ``pad_token_id`` with
    mask 0; the stop token itself stays valid (it is an action the policy took). Rows without a stop token
    keep all tokens and get ``has_stop = False``.
    """
    is_stop = torch.isin(responses, torch.tensor(stop_token_ids, dtype=responses.dtype, device=responses.device))
    # Number of stop tokens strictly before each position: 0 up to and including the first stop token.
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    mask = (stops_before == 0).long()
    return responses.masked_fill(mask == 0, pad_token_id), mask, is_stop.any(dim=1)


def apply_missing_eos_penalty(scores: torch.Tensor, has_stop: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Replace the score of responses that never produced a stop token: ``score = penalty`` there.

    This is lm-human-preferences' ``penalty_reward_value`` (TRL instead subtracts the penalty). A truncated
    response is not judged by the reward model at all: its score is a fixed, bad value, so the policy learns
    to finish. ``penalty=None`` keeps all scores.
    """
    if penalty is None:
        return scores
    return torch.where(has_stop.bool(), scores, torch.full_like(scores, penalty))


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), section 2.2, keeping the KL near ``target``.

    After each rollout batch of ``n_steps`` samples with mean KL ``current_kl``:
    ``err = clip(current_kl / target - 1, -0.2, 0.2)`` and ``kl_coef *= 1 + err * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
