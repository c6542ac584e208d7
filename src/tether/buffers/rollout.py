"""Preallocated (T, N, ...) on-policy rollout storage."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from tether.nets import Obs


def _alloc(space: gym.Space[Any], steps: int, num_envs: int, device: torch.device) -> Obs:
    if isinstance(space, gym.spaces.Dict):
        return {k: _alloc(s, steps, num_envs, device) for k, s in space.spaces.items()}  # type: ignore[misc]
    dtype = torch.uint8 if space.dtype == np.uint8 else torch.float32
    return torch.zeros((steps, num_envs, *(space.shape or ())), dtype=dtype, device=device)


def _write(dst: Obs, t: int, src: Any) -> None:
    if isinstance(dst, dict):
        for k, v in dst.items():
            _write(v, t, src[k])
    else:
        dst[t].copy_(torch.as_tensor(np.asarray(src), dtype=dst.dtype))


def flatten_obs(obs: Obs, index: torch.Tensor | slice | None = None) -> Obs:
    """(T, N, ...) → (T·N, ...), optionally indexed by `index` afterwards."""
    if isinstance(obs, dict):
        return {k: flatten_obs(v, index) for k, v in obs.items()}  # type: ignore[misc]
    flat = obs.reshape(-1, *obs.shape[2:])
    return flat if index is None else flat[index]


class RolloutBuffer:
    """One rollout of `steps` rows of `num_envs` transitions, kept as tensors.

    Final observations of truncated episodes are kept aside (they are few) so their values can
    be computed at update time and bootstrapped.
    """

    def __init__(
        self,
        steps: int,
        num_envs: int,
        observation_space: gym.Space[Any],
        action_space: gym.Space[Any],
        device: torch.device,
    ) -> None:
        self.steps, self.num_envs, self.device = steps, num_envs, device
        self.observation_space = observation_space
        self.obs = _alloc(observation_space, steps, num_envs, device)
        act_shape = () if isinstance(action_space, gym.spaces.Discrete) else action_space.shape or ()
        act_dtype = torch.int64 if isinstance(action_space, gym.spaces.Discrete) else torch.float32
        self.actions = torch.zeros((steps, num_envs, *act_shape), dtype=act_dtype, device=device)
        self.logp = torch.zeros((steps, num_envs), device=device)
        self.values = torch.zeros((steps, num_envs), device=device)
        self.rewards = torch.zeros((steps, num_envs), device=device)
        self.terminated = torch.zeros((steps, num_envs), dtype=torch.bool, device=device)
        self.done = torch.zeros((steps, num_envs), dtype=torch.bool, device=device)
        self.truncated_finals: list[tuple[int, int, Any]] = []
        self.last_next_obs: Any = None
        self.has_logp = True
        self.has_values = True
        self.pos = 0

    @property
    def full(self) -> bool:
        return self.pos >= self.steps

    def add(
        self,
        obs: Any,
        actions: np.ndarray,
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        next_obs: Any,
        logp: np.ndarray | None,
        values: np.ndarray | None,
    ) -> None:
        t = self.pos
        if t >= self.steps:
            raise RuntimeError("rollout buffer is full; call update() first")
        _write(self.obs, t, obs)
        self.actions[t].copy_(torch.as_tensor(np.asarray(actions)).reshape(self.actions[t].shape))
        self.rewards[t].copy_(torch.as_tensor(rewards, dtype=torch.float32))
        term = np.asarray(terminated, dtype=bool)
        trunc = np.asarray(truncated, dtype=bool) & ~term
        self.terminated[t].copy_(torch.as_tensor(term))
        self.done[t].copy_(torch.as_tensor(term | trunc))
        if logp is None:
            self.has_logp = False
        else:
            self.logp[t].copy_(torch.as_tensor(logp, dtype=torch.float32))
        if values is None:
            self.has_values = False
        else:
            self.values[t].copy_(torch.as_tensor(values, dtype=torch.float32))
        for i in np.flatnonzero(trunc):
            row = {k: v[i] for k, v in next_obs.items()} if isinstance(next_obs, dict) else next_obs[i]
            self.truncated_finals.append((t, int(i), row))
        self.last_next_obs = next_obs
        self.pos += 1

    def reset(self) -> None:
        self.pos = 0
        self.truncated_finals.clear()
        self.last_next_obs = None
        self.has_logp = True
        self.has_values = True
