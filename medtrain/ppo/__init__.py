"""Proximal Policy Optimisation for causal LMs: tensor maths (:mod:`core`), arguments, and the trainer."""

from medtrain.ppo.config import PPOArguments
from medtrain.ppo.core import AdaptiveKLController, FixedKLController
from medtrain.ppo.trainer import PPOTrainer

__all__ = ["AdaptiveKLController", "FixedKLController", "PPOArguments", "PPOTrainer"]
