"""Optimiser plumbing every gradient learner shares (PPO, DQN, SAC): fused Adam, a cheap gradient
clip and flushing denormals while updating. Small networks on a CPU are bound by per-op cost, so
each of these removes work without changing the update's arithmetic."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def clip_grad_norm(
    params: Sequence[torch.Tensor], max_norm: float, flat: list[torch.Tensor] | None = None
) -> None:
    """`torch.nn.utils.clip_grad_norm_(params, max_norm)` (same arithmetic) without its per-call
    grouping of tensors by device and dtype, which costs more than the three ops for a small net.
    `flat`: the one tensor behind every `.grad`, where there is one (`MlpPasses.allocate_grads`)."""
    clip_grads(flat or [p.grad for p in params if p.grad is not None], max_norm)


def clip_grads(grads: list[torch.Tensor], max_norm: float) -> None:
    """Scale `grads` in place so that their joint 2-norm is at most `max_norm`."""
    if not grads:
        return
    if len(grads) == 1:
        norm = torch.linalg.vector_norm(grads[0])
    else:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    # Below the limit the scale is exactly 1: on the CPU, where reading the norm costs nothing,
    # skip the multiply (on a GPU the read would wait for the device).
    if norm.device.type == "cpu" and float(norm) + 1e-6 <= max_norm:
        return
    scale = torch.clamp_max_(max_norm / (norm + 1e-6), 1.0)
    torch._foreach_mul_(grads, scale)


def adam_step(opt: torch.optim.Adam) -> None:
    """`opt.step()` for a fused Adam without weight decay or AMSGrad, calling the fused kernel
    directly: `Optimizer.step` regroups its tensors by device and dtype on every call, which costs
    as much as the kernel for a small net. The state it creates is the one `Adam` creates, so
    checkpoints load either way. Any other Adam configuration goes through `opt.step()`."""
    for group in opt.param_groups:
        if not group.get("fused") or group["weight_decay"] or group["amsgrad"] or group["maximize"]:
            opt.step()
            return
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = []
        for p in params:
            state = opt.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states.append(state)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=group["eps"],
            maximize=False,
        )
