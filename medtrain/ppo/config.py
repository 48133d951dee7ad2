"""PPO hyper-parameters (:class:`PPOArguments`), parseable with ``transformers.HfArgumentParser``.

Batch terms, per process: one PPO *update* generates ``rollout_batch_size`` responses, then runs
``num_ppo_epochs`` passes over them in ``num_mini_batches`` shuffled mini-batches (one optimizer step each);
a mini-batch is fed in micro-batches of ``micro_batch_size`` (gradient accumulation). The rollout forward
passes (logprobs, reference, values) also run in micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medtrain.errors import ConfigError
from medtrain.ppo.core import KL_ESTIMATORS

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class PPOArguments:
    """Rollout, reward shaping and PPO-update settings (Ziegler et al. 2019; TRL's PPOConfig names)."""

    # > Batches
    rollout_batch_size: int = field(
        default=16, metadata={"help": "Prompts per process per PPO update (responses generated per rollout)."}
    )
    num_mini_batches: int = field(
        default=1, metadata={"help": "Mini-batches per PPO epoch; each is one optimizer step. Must divide "
                             "rollout_batch_size."}
    )
    micro_batch_size: int | None = field(
        default=None, metadata={"help": "Sequences per forward/backward pass (gradient accumulation inside a "
                                "mini-batch, and the chunk size of rollout forward passes). Must divide the "
                                "mini-batch size. Default: the whole mini-batch."}
    )
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch per PPO update."})

    # > Generation
    max_new_tokens: int | None = field(
        default=None, metadata={"help": f"Most tokens generated per response (default {DEFAULT_MAX_NEW_TOKENS})."}
    )
    response_length: int | None = field(
        default=None, metadata={"help": "TRL's name for max_new_tokens; give one of the two (or equal values)."}
    )
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature. Logprobs of policy and reference use the same "
                               "temperature, so the KL is measured between the distributions actually sampled."}
    )
    top_k: int = field(default=0, metadata={"help": "Top-k sampling; 0 disables it."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling; 1.0 disables it."})

    # > Rewards and KL penalty
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient (the initial one if adaptive)."})
    kl_estimator: str = field(
        default="k1", metadata={"help": "Per-token KL estimator: k1 = logp - ref_logp, k3 = (r - 1) - log r.",
                                "choices": list(KL_ESTIMATORS)}
    )
    adaptive_kl: bool = field(
        default=False, metadata={"help": "Adapt kl_coef to keep the KL near kl_target (Ziegler et al.)."}
    )
    kl_target: float = field(default=6.0, metadata={"help": "Target KL per response (nats) when adaptive_kl."})
    kl_horizon: float = field(
        default=10000.0, metadata={"help": "Adaptive KL horizon in samples: a larger value adapts more slowly."}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Score given to responses that never produce a stop token (replaces the "
                                "reward-model score). None: score them like any other response."}
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Rescale per-token rewards to unit variance over the rollout batch."}
    )

    # > PPO losses
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss."})

    # > Engine
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass (less memory, ~30% slower)."}
    )

    def __post_init__(self) -> None:
        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        need(self.rollout_batch_size >= 1, f"rollout_batch_size must be >= 1, got {self.rollout_batch_size}")
        need(self.num_mini_batches >= 1, f"num_mini_batches must be >= 1, got {self.num_mini_batches}")
        need(self.num_ppo_epochs >= 1, f"num_ppo_epochs must be >= 1, got {self.num_ppo_epochs}")
        if self.rollout_batch_size >= 1 and self.num_mini_batches >= 1:
            if self.rollout_batch_size % self.num_mini_batches:
                problems.append(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                                f"num_mini_batches ({self.num_mini_batches})")
            elif self.micro_batch_size is not None:
                if self.micro_batch_size < 1 or self.mini_batch_size % self.micro_batch_size:
                    problems.append(f"micro_batch_size ({self.micro_batch_size}) must divide the mini-batch size "
                                    f"rollout_batch_size / num_mini_batches = {self.mini_batch_size}")
        if self.max_new_tokens is not None and self.response_length is not None \
                and self.max_new_tokens != self.response_length:
            problems.append(f"max_new_tokens ({self.max_new_tokens}) and response_length "
                            f"({self.response_length}) disagree: give one of them")
        if self.max_new_tokens is None:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS if self.response_length is None else self.response_length
        self.response_length = self.max_new_tokens
        need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
        need(self.kl_estimator in KL_ESTIMATORS,
             f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.adaptive_kl:
            need(self.kl_target > 0, f"kl_target must be > 0 with adaptive_kl, got {self.kl_target}")
            need(self.kl_horizon > 0, f"kl_horizon must be > 0 with adaptive_kl, got {self.kl_horizon}")
            need(self.kl_coef > 0, "kl_coef must be > 0 with adaptive_kl (a zero coefficient never adapts)")
        need(0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}")
        need(0 <= self.lam <= 1, f"lam must be in [0, 1], got {self.lam}")
        need(self.cliprange > 0, f"cliprange must be > 0, got {self.cliprange}")
        need(self.cliprange_value > 0, f"cliprange_value must be > 0, got {self.cliprange_value}")
        need(self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}")
        if problems:
            raise ConfigError(problems)

    @property
    def mini_batch_size(self) -> int:
        """Sequences per optimizer step, per process."""
        return self.rollout_batch_size // self.num_mini_batches

    @property
    def effective_micro_batch_size(self) -> int:
        """Sequences per forward/backward pass."""
        return self.micro_batch_size or self.mini_batch_size

    @property
    def micro_batches_per_mini_batch(self) -> int:
        """Micro-batches accumulated into one optimizer step."""
        return self.mini_batch_size // self.effective_micro_batch_size
