"""Shared building blocks of the medical LLM training pipeline (PT, SFT, RM, DPO, PPO)."""

from .allocator import enable_huge_pages, keep_freed_memory

__version__ = "0.1.0"

# CPU allocator settings, applied before any model is loaded; see medtrain/allocator.py for what they do, what they
# measured, and the environment variables that turn them off.
enable_huge_pages()
keep_freed_memory()
