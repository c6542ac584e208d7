"""Optimiser plumbing every gradient learner shares (PPO, DQN, SAC): fused Adam, a cheap gradient
clip and flushing denormals while updating. Small networks on a CPU are bound by per-op cost, so
each of these removes work without changing the update's arithmetic."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def adam(params: Any, lr: float, device: torch.device, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where the device supports it (fewer tiny ops)."""
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=device.type in ("cpu", "cuda"))


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat subnormal floats (|x| < 1.2e-38) as zero while inside. Adam's moment estimates of
    weights that stop getting gradient (dead ReLU units) decay through the subnormal range, where
    every CPU float op is many times slower; values that small change no update measurably. Turned
    back off on exit (PyTorch's default), so the rest of the process is unaffected."""
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_(params, max_norm)` (same arithmetic) without its per-call
    grouping of tensors by device and dtype, which costs more than the three ops for a small net."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
