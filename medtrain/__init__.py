"""Shared building blocks of the medical LLM training pipeline (PT, SFT, RM, DPO, PPO).

Importing the package (or any module of it) has no side effects: process-level settings (distributed environment,
DeepSpeed communication, allocator, tensorboard directory) are applied by :func:`medtrain.runtime.start_run`.
"""

__version__ = "0.1.0"
