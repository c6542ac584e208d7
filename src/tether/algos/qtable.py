"""Tabular Q-learning over a sparse table that grows with what the agent sees.

States are hashable keys (a screen id string from a phone, an int from a `Discrete` env) and each
state has its own set of actions, which may grow when a device reveals a new button. Memory is
proportional to the visited (state, action) pairs; nothing is preallocated.

Two ways in:

* `learn(state, action, reward, next_state, done, next_actions)` — one TD update, used directly by
  remote sources such as the MQTT server (states and actions are strings there);
* the `Learner` protocol (`act` / `observe` / `update`) for a `Discrete` Gymnasium env, where
  `observe` queues transitions and `update` applies them (n-step returns per env copy).

The update is the textbook one:  Q(s,a) ← Q(s,a) + α · (G − Q(s,a)), where
G = r + γ · max_a' Q(s',a') (or its n-step form), with no bootstrap when the episode terminated
(a truncated episode still bootstraps).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from tether.algos.base import ActOut, Transitions
from tether.algos.offpolicy import linear_schedule
from tether.checkpoint import generator_state, set_generator_state
from tether.config import ConfigError
from tether.errors import TetherError

JSON_FORMAT = "tether-qtable"
JSON_VERSION = 1


class QTableError(TetherError):
    """A Q-table could not be used or imported; the message says what to fix."""


class Config(BaseModel):
    """The `training` section for tabular Q-learning."""

    model_config = ConfigDict(extra="forbid")
    LIVE_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"learning_rate", "discount_factor", "epsilon_start", "epsilon_end", "epsilon_decay_steps"}
    )

    algorithm: Literal["qtable"] = "qtable"
    learning_rate: float = Field(0.1, gt=0.0, le=1.0, description="α, the step size of each TD update")
    discount_factor: float = Field(0.99, ge=0.0, le=1.0, description="γ")
    epsilon_start: float = Field(1.0, ge=0.0, le=1.0)
    epsilon_end: float = Field(0.05, ge=0.0, le=1.0)
    epsilon_decay_steps: int = Field(10_000, ge=0, description="transitions over which ε falls linearly")
    n_step: int = Field(1, ge=1, le=1000, description="n of the n-step return (1 = one-step Q-learning)")
    initial_q: float = Field(0.0, description="value of an action the table has not seen yet")
    train_freq: int = Field(1, ge=1, description="transitions queued by observe() before ready() is true")


def _key(x: Any) -> Hashable:
    """A table key: Python ints and strings as they are, numpy scalars unwrapped."""
    if isinstance(x, str | int) and not isinstance(x, bool):
        return x
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.str_):
        return str(x)
    if isinstance(x, np.ndarray) and x.size == 1 and np.issubdtype(x.dtype, np.integer):
        return int(x.reshape(()))
    if isinstance(x, bool | np.bool_):
        return int(x)
    raise QTableError(f"a Q-table key must be an int or a string, not {type(x).__name__}; encode it first.")


class QTableLearner:
    """Sparse tabular Q-learning (see the module docstring)."""

    def __init__(
        self,
        config: Config | None = None,
        observation_space: gym.Space | None = None,
        action_space: gym.Space | None = None,
        seed: int = 0,
    ) -> None:
        self.config = config or Config()
        self.observation_space = observation_space
        self.action_space = action_space
        # For a Discrete env every state offers the same actions; remote states bring their own.
        self._env_actions: list[int] | None = (
            list(range(int(action_space.n))) if isinstance(action_space, gym.spaces.Discrete) else None
        )
        self.table: dict[Hashable, dict[Hashable, float]] = {}
        self._entries = 0  # (state, action) pairs in the table, kept as a counter
        self.steps = 0  # transitions learned from; drives the ε schedule
        self.updates = 0
        self.rng = np.random.default_rng(seed)
        self._pending: list[Transitions] = []
        self._pending_rows = 0
        self._windows: list[deque[tuple[Hashable, Hashable, float]]] = []  # per env copy, for n-step

    # ----------------------------------------------------------------------------- table access
    @property
    def num_states(self) -> int:
        return len(self.table)

    @property
    def num_entries(self) -> int:
        return self._entries

    @property
    def epsilon(self) -> float:
        c = self.config
        return linear_schedule(c.epsilon_start, c.epsilon_end, c.epsilon_decay_steps, self.steps)

    def _row(self, state: Hashable, extra: Iterable[Any] | None = None) -> dict[Hashable, float]:
        """The state's action values, creating the state and any new actions at `initial_q`."""
        row = self.table.get(state)
        if row is None:
            row = self.table[state] = {}
            if self._env_actions is not None:
                row.update(dict.fromkeys(self._env_actions, self.config.initial_q))
                self._entries += len(row)
        if extra is not None:
            for a in extra:
                k = _key(a)
                if k not in row:
                    row[k] = self.config.initial_q
                    self._entries += 1
        return row

    def add_actions(self, state: Any, actions: Iterable[Any]) -> None:
        """Make `actions` available in `state` (new ones start at `initial_q`)."""
        self._row(_key(state), actions)

    def q_values(self, state: Any) -> dict[Hashable, float]:
        """A copy of the state's action values (empty for a state never seen)."""
        row = self.table.get(_key(state))
        if row is None:
            return {a: self.config.initial_q for a in self._env_actions} if self._env_actions else {}
        return dict(row)

    def _candidates(self, state: Hashable, available: Sequence[Any] | None) -> dict[Hashable, float]:
        row = self.table.get(state, {})
        if available is None:
            if row:
                return row
            if self._env_actions is not None:
                return dict.fromkeys(self._env_actions, self.config.initial_q)
            raise QTableError(f"state {state!r} has no known actions; pass the available actions.")
        if len(available) == 0:
            raise QTableError(f"no actions are available in state {state!r}; pass at least one.")
        init = self.config.initial_q
        return {k: row.get(k, init) for k in map(_key, available)}

    def greedy(self, state: Any, available: Sequence[Any] | None = None) -> Hashable:
        """The best known action (the first one on a tie, so the answer is reproducible)."""
        cands = self._candidates(_key(state), available)
        return max(cands, key=cands.__getitem__)

    def select(self, state: Any, available: Sequence[Any] | None = None, explore: bool = True) -> Hashable:
        """ε-greedy choice; ties between best actions are broken at random while exploring."""
        cands = self._candidates(_key(state), available)
        if not explore:
            return max(cands, key=cands.__getitem__)
        actions = list(cands)
        if self.rng.random() < self.epsilon:
            return actions[int(self.rng.integers(len(actions)))]
        best = max(cands.values())
        ties = [a for a in actions if cands[a] == best]
        return ties[0] if len(ties) == 1 else ties[int(self.rng.integers(len(ties)))]

    def _max_q(self, state: Hashable, next_actions: Sequence[Any] | None) -> float:
        row = self._row(state, next_actions)
        return max(row.values()) if row else 0.0

    def learn(
        self,
        state: Any,
        action: Any,
        reward: float,
        next_state: Any,
        done: bool,
        next_actions: Sequence[Any] | None = None,
    ) -> float:
        """One Q-learning update; returns the TD error G − Q(s,a) before the update.

        `done` means the episode terminated (no bootstrap); pass False for a time-limit cut.
        `next_actions` adds the actions `next_state` offers (a newly revealed button counts from
        now on at `initial_q`)."""
        reward = float(reward)
        if not math.isfinite(reward):
            raise QTableError("reward must be a finite number; drop or clip the transition.")
        s, a = _key(state), _key(action)
        row = self._row(s, (a,))
        if done:
            target = reward
            if next_actions is not None:
                self._row(_key(next_state), next_actions)
        else:
            target = reward + self.config.discount_factor * self._max_q(_key(next_state), next_actions)
        td = target - row[a]
        row[a] += self.config.learning_rate * td
        self.steps += 1
        return td

    # --------------------------------------------------------------------- Learner protocol
    def act(self, obs: np.ndarray, explore: bool = True) -> ActOut:
        obs = np.asarray(obs).reshape(-1)
        actions = np.fromiter((self.select(o, None, explore) for o in obs.tolist()), np.int64, len(obs))
        return ActOut(action=actions)

    def observe(self, batch: Transitions) -> None:
        self._pending.append(batch)
        self._pending_rows += len(batch)

    def ready(self) -> bool:
        return self._pending_rows >= self.config.train_freq

    def update(self) -> dict[str, float]:
        """Apply the queued transitions in order, as (n-step) Q-learning updates."""
        n, gamma = self.config.n_step, self.config.discount_factor
        abs_td: list[float] = []
        for batch in self._pending:
            obs, act = np.asarray(batch.obs).reshape(len(batch), -1), np.asarray(batch.action).reshape(-1)
            nxt = np.asarray(batch.next_obs).reshape(len(batch), -1)
            rew, term, trunc = (
                np.asarray(x).reshape(-1) for x in (batch.reward, batch.terminated, batch.truncated)
            )
            while len(self._windows) < len(batch):
                self._windows.append(deque())
            for i in range(len(batch)):
                if n == 1:
                    abs_td.append(abs(self.learn(obs[i, 0], act[i], rew[i], nxt[i, 0], bool(term[i]))))
                    continue
                win = self._windows[i]
                win.append((_key(obs[i, 0]), _key(act[i]), float(rew[i])))
                end = bool(term[i] or trunc[i])
                # Each full window (or, at an episode end, every suffix) yields one n-step update.
                while win and (len(win) == n or end):
                    g = sum(r * gamma**k for k, (_, _, r) in enumerate(win))
                    s0, a0, _ = win[0]
                    if not term[i]:
                        g += gamma ** len(win) * self._max_q(_key(nxt[i, 0]), None)
                    row = self._row(s0, (a0,))
                    td = g - row[a0]
                    row[a0] += self.config.learning_rate * td
                    abs_td.append(abs(td))
                    win.popleft()
                self.steps += 1
        self._pending.clear()
        self._pending_rows = 0
        self.updates += 1
        return {
            "td_error": float(np.mean(abs_td)) if abs_td else 0.0,
            "epsilon": self.epsilon,
            "num_states": float(self.num_states),
            "num_entries": float(self.num_entries),
        }

    def policy(self) -> torch.nn.Module:
        """Q-values (B, n_actions) for integer observations, from a snapshot of the table."""
        if not isinstance(self.observation_space, gym.spaces.Discrete) or self._env_actions is None:
            raise QTableError("a Q-table keyed by strings has no tensor policy; export it with to_json().")
        n_states, n_actions = int(self.observation_space.n), len(self._env_actions)
        start = int(self.observation_space.start)
        values = torch.full((n_states, n_actions), float(self.config.initial_q))
        for s, row in self.table.items():
            if isinstance(s, int) and 0 <= s - start < n_states:
                for a, q in row.items():
                    if isinstance(a, int) and 0 <= a < n_actions:
                        values[s - start, a] = q
        return QTablePolicy(values, start)

    # ------------------------------------------------------------------------ import / export
    def to_json(self) -> dict[str, Any]:
        """The table as JSON-able data: `{"q": {state: {action: value}}}` with string keys, and
        `state_type` / `action_type` ("int" or "str") so keys come back with their type."""

        def kind(keys: Iterable[Hashable]) -> str:
            return "int" if all(isinstance(k, int) for k in keys) else "str"

        actions = [a for row in self.table.values() for a in row]
        return {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "state_type": kind(self.table),
            "action_type": kind(actions),
            "num_states": self.num_states,
            "num_entries": self.num_entries,
            "q": {str(s): {str(a): float(q) for a, q in row.items()} for s, row in self.table.items()},
        }

    def from_json(self, data: Any) -> None:
        """Replace the table with one produced by `to_json()` (validated; hostile input raises
        `QTableError` and leaves the current table untouched)."""
        self.table = parse_qtable_json(data)
        self._entries = sum(len(row) for row in self.table.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "table": self.to_json(),
            "steps": self.steps,
            "updates": self.updates,
            "rng": generator_state(self.rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.from_json(state["table"])
        self.steps = int(state.get("steps", 0))
        self.updates = int(state.get("updates", 0))
        if "rng" in state:
            set_generator_state(self.rng, state["rng"])
        self._pending.clear()
        self._pending_rows = 0
        self._windows.clear()


def parse_qtable_json(data: Any) -> dict[Hashable, dict[Hashable, float]]:
    """Validate `to_json()` output and return the table it describes."""
    if not isinstance(data, dict):
        raise QTableError("a Q-table must be a JSON object; send the output of to_json().")
    if data.get("format") != JSON_FORMAT or data.get("version") != JSON_VERSION:
        raise QTableError(f"not a {JSON_FORMAT} v{JSON_VERSION} document; send the output of to_json().")
    types = (str(data.get("state_type")), str(data.get("action_type")))
    if any(t not in ("int", "str") for t in types):
        raise QTableError("state_type and action_type must each be 'int' or 'str'.")
    q = data.get("q")
    if not isinstance(q, dict):
        raise QTableError("the Q-table's 'q' field must map states to {action: value} objects.")

    def conv(k: Any, t: str) -> Hashable:
        if not isinstance(k, str):
            raise QTableError("Q-table keys must be strings in JSON.")
        if t == "str":
            return k
        try:
            return int(k)
        except ValueError:
            raise QTableError(
                f"Q-table key {k[:40]!r} is not an integer as state_type/action_type say."
            ) from None

    table: dict[Hashable, dict[Hashable, float]] = {}
    for s, row in q.items():
        if not isinstance(row, dict):
            raise QTableError("each state in the Q-table must map actions to numbers.")
        out: dict[Hashable, float] = {}
        for a, v in row.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise QTableError("Q-table values must be finite numbers.")
            out[conv(a, types[1])] = float(v)
        table[conv(s, types[0])] = out
    return table


class QTablePolicy(torch.nn.Module):
    """Row lookup: integer observations (B,) or (B, 1) → Q-values (B, n_actions)."""

    values: torch.Tensor

    def __init__(self, values: torch.Tensor, start: int = 0) -> None:
        super().__init__()
        self.register_buffer("values", values)
        self.start = start

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        idx = obs.reshape(-1).long() - self.start
        return self.values[idx.clamp(0, self.values.shape[0] - 1)]


def build(
    config: Config,
    observation_space: gym.Space,
    action_space: gym.Space,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> QTableLearner:
    if not isinstance(observation_space, gym.spaces.Discrete) or not isinstance(
        action_space, gym.spaces.Discrete
    ):
        raise ConfigError(
            "training.algorithm qtable needs Discrete observations and actions; use dqn for other spaces."
        )
    return QTableLearner(config, observation_space, action_space, seed=seed)
