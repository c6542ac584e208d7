"""Network building blocks: MLPs and the actor-critic interface PPO trains.

Only stable pieces live here; each algorithm builds its own heads from them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal

from tether.config import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}

Obs = torch.Tensor | dict[str, torch.Tensor]


def mlp(
    in_dim: int,
    hidden: list[int] | tuple[int, ...],
    out_dim: int,
    activation: str = "tanh",
    out_gain: float = 1.0,
) -> nn.Sequential:
    """Linear layers with `activation` between them and orthogonal init (gain √2 hidden,
    `out_gain` on the output layer), the initialisation PPO and DQN references use."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}'; choose one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        linear = nn.Linear(last, width)
        nn.init.orthogonal_(linear.weight, math.sqrt(2))
        nn.init.zeros_(linear.bias)
        layers += [linear, ACTIVATIONS[activation]()]
        last = width
    head = nn.Linear(last, out_dim)
    nn.init.orthogonal_(head.weight, out_gain)
    nn.init.zeros_(head.bias)
    layers.append(head)
    return nn.Sequential(*layers)


class ActorCritic(nn.Module, ABC):
    """What PPO trains: an action distribution, a value, and a deterministic action for export."""

    @abstractmethod
    def distribution(self, obs: Obs) -> Distribution: ...

    @abstractmethod
    def value(self, obs: Obs) -> torch.Tensor: ...

    @abstractmethod
    def forward(self, obs: Obs) -> torch.Tensor:
        """The deterministic action: the mean for Box actions, the argmax for Discrete."""


class MlpActorCritic(ActorCritic):
    """Separate actor and critic MLPs; Gaussian with a state-independent log-std for Box actions,
    categorical for Discrete."""

    def __init__(
        self,
        obs_dim: int,
        action_space: gym.Space[Any],
        actor_layers: list[int],
        value_layers: list[int],
        activation: str = "tanh",
        log_std_init: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(action_space, gym.spaces.Box):
            self.discrete = False
            act_dim = int(np.prod(action_space.shape))
            self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))
        elif isinstance(action_space, gym.spaces.Discrete):
            self.discrete = True
            act_dim = int(action_space.n)
        else:
            raise TypeError(f"PPO supports Box and Discrete actions, not {type(action_space).__name__}")
        self.actor = mlp(obs_dim, actor_layers, act_dim, activation, out_gain=0.01)
        self.critic = mlp(obs_dim, value_layers, 1, activation, out_gain=1.0)

    def distribution(self, obs: Obs) -> Distribution:
        out = self.actor(obs)
        if self.discrete:
            return Categorical(logits=out)
        return Independent(Normal(out, self.log_std.exp().expand_as(out)), 1)

    def value(self, obs: Obs) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def forward(self, obs: Obs) -> torch.Tensor:
        out = self.actor(obs)
        return out.argmax(-1) if self.discrete else out


class AngleFeatures(nn.Module):
    """Replaces the angle entries of a flat observation by their sine and cosine (appended after the
    other entries, which keep their order): headings of +π and −π are one direction, and a network
    fed the raw angle has to learn that jump, which makes driving west much harder than east."""

    keep: torch.Tensor
    angles: torch.Tensor

    def __init__(self, obs_dim: int, angle_indices: list[int]) -> None:
        super().__init__()
        bad = [i for i in angle_indices if not 0 <= i < obs_dim]
        if bad or len(set(angle_indices)) != len(angle_indices):
            raise ValueError(
                f"angle indices {angle_indices} must be distinct positions in a {obs_dim}-D observation"
            )
        keep = [i for i in range(obs_dim) if i not in set(angle_indices)]
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.long))
        self.register_buffer("angles", torch.tensor(angle_indices, dtype=torch.long))
        self.out_dim = len(keep) + 2 * len(angle_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x[..., self.angles]
        return torch.cat([x[..., self.keep], torch.sin(a), torch.cos(a)], dim=-1)


def angle_features(observation_space: gym.Space, angle_indices: list[int]) -> AngleFeatures:
    """`AngleFeatures` for a learner's `training.angle_obs`: a `ConfigError` naming the key when the
    space is not a flat Box or the indices do not fit it."""
    shape = observation_space.shape or ()
    if not isinstance(observation_space, gym.spaces.Box) or len(shape) != 1:
        raise ConfigError("training.angle_obs needs a flat Box observation space")
    try:
        return AngleFeatures(shape[0], angle_indices)
    except ValueError as exc:
        raise ConfigError(f"training.angle_obs: {exc}") from None


class RunningNorm(nn.Module):
    """Running mean/variance of observations (parallel-variance merge), applied as
    `clip((x - mean) / sqrt(var + eps))`. Stored as buffers so it is saved, loaded and exported."""

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))
        self.clip = clip
        self.eps = eps

    @torch.no_grad()
    def update(self, batch: np.ndarray) -> None:
        x = torch.as_tensor(batch, dtype=torch.float64).reshape(-1, *self.mean.shape)
        b_mean, b_var, b_count = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta = b_mean - self.mean
        total = self.count + b_count
        self.mean += delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta.pow(2) * self.count * b_count / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x.dtype)
        std = torch.sqrt(self.var.to(x.dtype) + self.eps)
        return torch.clamp((x - mean) / std, -self.clip, self.clip)
