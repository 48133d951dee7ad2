"""Shared building blocks of the medical LLM training pipeline (PT, SFT, RM, DPO, PPO)."""

__version__ = "0.1.0"
