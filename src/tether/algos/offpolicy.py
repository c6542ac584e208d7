"""What the replay-based learners (DQN, SAC) share: the replay buffer built from their config, the
replay ratio (`gradient_steps` per `train_freq` transitions observed after `learning_starts`), the
learning-rate annealing, and the counters that go into checkpoints."""

from __future__ import annotations

import logging
from typing import Any

import gymnasium as gym

from tether.algos.base import Transitions
from tether.buffers.replay import ReplayBuffer

log = logging.getLogger(__name__)


def linear_schedule(start: float, end: float, steps: int, t: int) -> float:
    """`start` falling (or rising) linearly to `end` over `steps`, then `end`; `end` if steps <= 0."""
    if steps <= 0:
        return end
    return start + min(1.0, t / steps) * (end - start)


class ReplayLearner:
    """Base of DQN and SAC. Subclasses call `_init_replay` in `__init__`, `_count` from `observe`,
    `_take_rounds` at the start of `update`, and merge `_counter_state` into their checkpoints."""

    config: Any
    buffer: ReplayBuffer

    def _init_replay(
        self,
        name: str,
        observation_space: gym.Space,
        action_space: gym.Space,
        seed: int,
        total_steps: int | None,
        **extra: Any,
    ) -> None:
        c = self.config
        self.buffer = ReplayBuffer.for_spaces(
            c.buffer_size,
            observation_space,
            action_space,
            n_step=c.n_step,
            gamma=c.discount_factor,
            prioritized=c.prioritized,
            alpha=c.per_alpha,
            beta_start=c.per_beta_start,
            beta_steps=c.per_beta_steps or total_steps or 100_000,
            seed=seed + 1,
            **extra,
        )
        log.info("%s: %s", name, self.buffer.describe())
        self.total_steps = total_steps
        self.steps = 0  # transitions observed
        self.grad_steps = 0
        self._due = 0  # transitions observed since the last round, after learning_starts

    @property
    def learning_rate(self) -> float:
        c = self.config
        if not c.anneal_lr or not self.total_steps:
            return c.learning_rate
        return c.learning_rate * max(0.0, 1.0 - self.steps / self.total_steps)

    def _count(self, batch: Transitions) -> None:
        """Store `batch` and count it towards the replay ratio."""
        self.buffer.add(batch)
        before = self.steps
        self.steps += len(batch)
        self._due += max(0, self.steps - max(before, self.config.learning_starts))

    def ready(self) -> bool:
        c = self.config
        return self._due >= c.train_freq and len(self.buffer) >= c.batch_size

    def _take_rounds(self) -> int:
        """Rounds of `gradient_steps` that are due now (the remainder waits for the next call)."""
        rounds, self._due = divmod(self._due, self.config.train_freq)
        return rounds

    def _counter_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps, "grad_steps": self.grad_steps, "due": self._due}
        if self.config.save_replay:
            state["replay"] = self.buffer.state_dict()
        return state

    def _load_counter_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.grad_steps = int(state.get("grad_steps", 0))
        self._due = int(state.get("due", 0))
        if "replay" in state:
            self.buffer.load_state_dict(state["replay"])
