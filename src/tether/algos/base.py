"""The one small protocol every learner speaks, and the batch type it consumes.

A learner never knows where its batches came from: a vector env, an MQTT device, a ZeroMQ rover
or the store all hand it the same `Transitions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@dataclass
class Transitions:
    """A batch of N transitions, one per environment (or per remote sample).

    `next_obs` is the true successor of `obs`: at an episode end it is the final observation, not
    the first observation of the next episode. `terminated` and `truncated` are kept apart so that
    learners bootstrap on truncation. `extras` carries what `act()` returned for these steps
    (for example `logp` and `value` for PPO); remote sources may leave it empty. For a Dict
    observation space, `obs` and `next_obs` map each key to its batch.
    """

    obs: np.ndarray | dict[str, np.ndarray]
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray | dict[str, np.ndarray]
    terminated: np.ndarray
    truncated: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.reward.shape[0])

    @property
    def done(self) -> np.ndarray:
        return np.logical_or(self.terminated, self.truncated)


@dataclass
class ActOut:
    """What `Learner.act` returns: the actions to send, plus per-step extras for `observe`."""

    action: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)


@runtime_checkable
class Learner(Protocol):
    """One learning algorithm. The trainer thread is its only owner."""

    def act(self, obs: np.ndarray, explore: bool = True) -> ActOut: ...

    def observe(self, batch: Transitions) -> None: ...

    def ready(self) -> bool: ...

    def update(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def policy(self) -> torch.nn.Module: ...
