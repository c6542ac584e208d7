"""Optimiser plumbing every gradient learner shares (PPO, DQN, SAC): fused Adam, a cheap gradient
clip and flushing denormals while updating. Small networks on a CPU are bound by per-op cost, so
each of these removes work without changing the update's arithmetic."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch


def adam(params: Any, lr: float, device: torch.device, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where the device supports it (fewer tiny ops)."""
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=device.type in ("cpu", "cuda"))


_FloatEnvSetter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _PoolFloatEnv:
    """Copies the calling thread's floating-point environment onto the OpenMP threads that run its
    torch ops. `torch.set_flush_denormal` sets the flush-to-zero bits of the calling thread only,
    and OpenMP's threads take the environment of the thread that started them, once: with two
    threads, half of every parallel op kept computing on subnormals (a DQN round's fused Adam took
    240 µs a step instead of 70). One `GOMP_parallel` region runs libm's `fesetenv` on each thread
    of the caller's team, in C, without the GIL (about 2 µs)."""

    def __init__(self, gomp: ctypes.CDLL, libm: ctypes.CDLL) -> None:
        self._parallel = gomp.GOMP_parallel
        self._parallel.argtypes = [_FloatEnvSetter, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        self._parallel.restype = None
        self._getenv = libm.fegetenv
        self._getenv.argtypes = [ctypes.c_void_p]
        self._setenv = ctypes.cast(libm.fesetenv, _FloatEnvSetter)  # int(fenv_t*); the int is unused

    def share(self) -> None:
        env = ctypes.create_string_buffer(256)  # larger than any platform's fenv_t
        if self._getenv(env) == 0:
            self._parallel(self._setenv, ctypes.addressof(env), torch.get_num_threads(), 0)


@cache
def _pool_float_env() -> _PoolFloatEnv | None:
    """The setter for torch's OpenMP runtime (as loaded by this process), or None where torch's
    threads are not OpenMP's or the libraries are not found (there only the caller's thread
    flushes, as PyTorch does)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
        # The copy torch ships first, should the process have loaded another one too.
        torch_dir = os.path.dirname(torch.__file__)
        gomp = ctypes.CDLL(
            min((p for p in paths if p.startswith("/")), key=lambda p: (torch_dir not in p, p))
        )
        libm_name = ctypes.util.find_library("m")
        if libm_name is None or not hasattr(gomp, "GOMP_parallel"):
            return None
        return _PoolFloatEnv(gomp, ctypes.CDLL(libm_name))
    except (OSError, ValueError):
        return None


_flush_depth = threading.local()


def set_flush_denormals(on: bool) -> bool:
    """`torch.set_flush_denormal(on)` for the calling thread and the OpenMP threads its torch ops
    run on; False where the CPU cannot flush."""
    supported = torch.set_flush_denormal(on)
    env = _pool_float_env() if supported else None
    if env is not None:
        env.share()
    return supported


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat subnormal floats (|x| < 1.2e-38) as zero while inside, in every thread of this
    thread's torch ops. Adam's moment estimates of weights that stop getting gradient (dead ReLU
    units) decay through the subnormal range, where every CPU float op is many times slower;
    values that small change no update measurably. Turned back off when the outermost block exits
    (PyTorch's default), so the rest of the process is unaffected."""
    depth = getattr(_flush_depth, "value", 0)
    if depth == 0 and not set_flush_denormals(True):
        yield  # this CPU cannot flush
        return
    _flush_depth.value = depth + 1
    try:
        yield
    finally:
        _flush_depth.value = depth
        if depth == 0:
            set_flush_denormals(False)


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
