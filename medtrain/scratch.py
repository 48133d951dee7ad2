"""Per-thread CPU scratch buffers, reused from call to call (the fused LoRA branch's dropped input, the fused loss's
(chunk, vocab) tiles).

A fresh multi-MB tensor per call costs more in page faults than the work done in it. Even with malloc keeping freed
memory (``medtrain.allocator``), a freed block is carved up by smaller allocations before the same size is asked for
again, so the next one is fresh memory: the fused loss's three tiles (250 MB on the SFT bench job) took 12,000-58,000
page faults per step, 100-300 ms, before they were kept here. The buffers stay allocated until their thread ends
(the loss's peak holds them anyway; after training they are what the next loss, e.g. an evaluation, reuses).
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(name: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """This thread's CPU buffer ``name`` viewed as ``shape`` (contents undefined), grown to the largest size asked; on
    other devices (whose allocators cache freed blocks themselves) a fresh ``torch.empty``.

    Each name is one buffer: a caller must be done with the previous view of ``name`` before asking for it again.
    """
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = 1
    for size in shape:
        numel *= size
    buffer = getattr(_local, name, None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        setattr(_local, name, buffer)
    return buffer[:numel].view(shape)
