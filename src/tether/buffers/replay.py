"""Replay memory for off-policy learners: a preallocated numpy ring, uniform or prioritized
sampling, and n-step returns folded in as transitions arrive.

Everything is stored per transition in flat arrays (`capacity` rows each), so the memory is known
up front (`nbytes`) and sampling is a handful of vectorised gathers. `terminated` and
`truncated` are kept apart: a learner bootstraps through truncation and stops at termination.

Any source can `add()` a `Transitions` batch of any size. For n > 1 the buffer needs to know
which rows continue which: by default row i of every batch belongs to stream i (the layout of a
vector env, one row per env copy); a remote source that sends several consecutive steps of one
device in a batch puts an integer `stream` id per row in `extras["stream"]` (rows of one stream in
time order). With n = 1 rows are independent and the stream does not matter.

An n-step transition stores (s_t, a_t, G, s_{t+k}, terminated, truncated, discount = γ^k) where
G = Σ_{i<k} γ^i r_{t+i} and k = n, or fewer when the episode ended first; the learner's target is
G + discount · (1 − terminated) · V(s_{t+k}).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from tether.algos.base import Transitions
from tether.buffers.sumtree import SumTree
from tether.checkpoint import generator_state, set_generator_state
from tether.errors import TetherError

log = logging.getLogger(__name__)


class ReplayError(TetherError):
    """A batch does not fit the replay buffer (wrong shape, NaN/inf) or a saved buffer is damaged."""


@dataclass
class ReplaySample:
    """A sampled batch (numpy). `weights` are importance-sampling weights (ones when uniform)."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    discount: np.ndarray
    weights: np.ndarray
    indices: np.ndarray


@dataclass
class TensorSample:
    """A sampled batch as torch tensors on the learner's device; `not_done` = 1 − terminated."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    not_done: torch.Tensor
    discount: torch.Tensor
    weights: torch.Tensor
    indices: np.ndarray

    def split(self, size: int) -> list[TensorSample]:
        """Consecutive batches of `size` rows (views): one split per field for a whole block."""
        fields = (
            self.obs,
            self.action,
            self.reward,
            self.next_obs,
            self.not_done,
            self.discount,
            self.weights,
        )
        parts = [x.split(size) for x in fields]
        indices = [self.indices[i : i + size] for i in range(0, len(self.indices), size)]
        return [
            TensorSample(o, a, r, n, d, g, w, idx)
            for o, a, r, n, d, g, w, idx in zip(*parts, indices, strict=True)
        ]


class ReplayBuffer:
    """Ring buffer of transitions with optional prioritized sampling and n-step returns."""

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        action_shape: tuple[int, ...] = (),
        obs_dtype: Any = np.float32,
        action_dtype: Any = np.int64,
        n_step: int = 1,
        gamma: float = 0.99,
        prioritized: bool = False,
        alpha: float = 0.6,
        beta_start: float = 0.4,
        beta_end: float = 1.0,
        beta_steps: int = 100_000,
        priority_eps: float = 1e-6,
        seed: int = 0,
    ) -> None:
        if capacity < 1:
            raise ReplayError("buffer_size must be at least 1; raise it in the training section.")
        if n_step < 1:
            raise ReplayError("n_step must be at least 1.")
        self.capacity = int(capacity)
        self.obs_shape, self.action_shape = tuple(obs_shape), tuple(action_shape)
        self.obs_dtype, self.action_dtype = np.dtype(obs_dtype), np.dtype(action_dtype)
        self.n_step, self.gamma = int(n_step), float(gamma)
        self.prioritized = prioritized
        self.alpha, self.beta_start, self.beta_end = float(alpha), float(beta_start), float(beta_end)
        self.beta_steps, self.priority_eps = int(beta_steps), float(priority_eps)
        self.rng = np.random.default_rng(seed)

        cap = self.capacity
        self.obs = np.zeros((cap, *self.obs_shape), self.obs_dtype)
        self.next_obs = np.zeros((cap, *self.obs_shape), self.obs_dtype)
        self.action = np.zeros((cap, *self.action_shape), self.action_dtype)
        self.reward = np.zeros(cap, np.float32)
        self.terminated = np.zeros(cap, np.bool_)
        self.truncated = np.zeros(cap, np.bool_)
        self.discount = np.zeros(cap, np.float32)
        self.tree = SumTree(cap) if prioritized else None
        self.max_priority = 1.0
        self.ptr = 0
        self.size = 0
        self.added = 0  # transitions written since creation (drives β annealing)

        # n-step windows, one per stream: the last < n steps not yet written.
        self._streams: dict[int, int] = {}
        self._positional: dict[int, np.ndarray] = {}  # batch rows → slots of streams 0..rows-1
        self._w_obs = np.zeros((0, self.n_step, *self.obs_shape), self.obs_dtype)
        self._w_act = np.zeros((0, self.n_step, *self.action_shape), self.action_dtype)
        self._w_rew = np.zeros((0, self.n_step), np.float64)
        self._w_len = np.zeros(0, np.int64)
        self._powers = self.gamma ** np.arange(self.n_step + 1)
        self._rows_seen: int | None = None
        self._warned = False

    @classmethod
    def for_spaces(
        cls, capacity: int, observation_space: gym.Space, action_space: gym.Space, **kwargs: Any
    ) -> ReplayBuffer:
        """A buffer shaped for a Box/Discrete observation and action space (float obs are stored as
        float32, images keep their uint8)."""
        obs_dtype: Any = observation_space.dtype if observation_space.dtype == np.uint8 else np.float32
        if isinstance(observation_space, gym.spaces.Discrete):
            obs_dtype = np.int64
        act_shape: tuple[int, ...] = ()
        act_dtype: Any = np.int64
        if not isinstance(action_space, gym.spaces.Discrete):
            act_shape, act_dtype = tuple(action_space.shape or ()), np.float32
        return cls(capacity, tuple(observation_space.shape or ()), act_shape, obs_dtype, act_dtype, **kwargs)

    # ------------------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        arrays = (
            self.obs,
            self.next_obs,
            self.action,
            self.reward,
            self.terminated,
            self.truncated,
            self.discount,
        )
        return sum(a.nbytes for a in arrays) + (self.tree.nbytes if self.tree is not None else 0)

    def describe(self) -> str:
        per = self.nbytes / self.capacity
        kind = "prioritized" if self.prioritized else "uniform"
        return (
            f"{kind} replay of {self.capacity:,} transitions ({self.n_step}-step), "
            f"{per:,.0f} B each, {self.nbytes / 2**20:,.1f} MiB preallocated"
        )

    @property
    def beta(self) -> float:
        frac = min(1.0, self.added / self.beta_steps) if self.beta_steps > 0 else 1.0
        return self.beta_start + frac * (self.beta_end - self.beta_start)

    # ------------------------------------------------------------------------------ adding
    def _check(self, batch: Transitions) -> tuple[np.ndarray, ...]:
        b = len(batch)
        try:
            obs = np.asarray(batch.obs).reshape((b, *self.obs_shape))
            next_obs = np.asarray(batch.next_obs).reshape((b, *self.obs_shape))
            action = np.asarray(batch.action).reshape((b, *self.action_shape))
            reward = np.asarray(batch.reward, dtype=np.float64).reshape(b)
            term = np.asarray(batch.terminated).reshape(b).astype(bool)
            trunc = np.asarray(batch.truncated).reshape(b).astype(bool)
        except (ValueError, TypeError):
            raise ReplayError(
                f"a batch of {b} transitions does not fit the buffer (observations {self.obs_shape}, actions "
                f"{self.action_shape}); send arrays shaped ({b}, ...) for every field."
            ) from None
        for name, arr in (("reward", reward), ("obs", obs), ("next_obs", next_obs), ("action", action)):
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ReplayError(f"the batch's {name} holds NaN or inf; drop or clip those transitions.")
        return obs, action, reward, next_obs, term, trunc

    def add(self, batch: Transitions) -> None:
        """Store a batch (see the module docstring for how n-step streams are matched)."""
        if len(batch) == 0:
            return
        obs, action, reward, next_obs, term, trunc = self._check(batch)
        if self.n_step == 1:
            self._write(obs, action, reward, next_obs, term, trunc, np.full(len(reward), self.gamma))
            return
        streams = batch.extras.get("stream") if batch.extras else None
        if streams is None and self._rows_seen not in (None, len(reward)) and not self._warned:
            self._warned = True
            log.warning(
                "n-step replay got batches of %d and %d rows without extras['stream']: rows are matched to "
                "streams by position, which is only right for one row per env copy",
                self._rows_seen,
                len(reward),
            )
        self._rows_seen = len(reward)
        if streams is None:  # one row per stream: a single round (the per-env-step case, kept cheap)
            slots = self._positional.get(len(reward))
            if slots is None:
                slots = self._positional[len(reward)] = self._slots(np.arange(len(reward)))
            if len(slots) == 1:
                self._add_one(int(slots[0]), obs, action, reward, next_obs, term, trunc)
            else:
                self._add_round(slots, obs, action, reward, next_obs, term, trunc)
            return
        slots = self._slots(np.asarray(streams).reshape(len(reward)).astype(np.int64))
        # Rows of the same stream must be applied in order: split into rounds of distinct streams.
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        first = np.r_[0, np.flatnonzero(np.diff(sorted_slots)) + 1]
        rank = np.empty(len(slots), np.int64)
        rank[order] = np.arange(len(slots)) - np.repeat(first, np.diff(np.r_[first, len(slots)]))
        for r in range(int(rank.max()) + 1):
            rows = np.flatnonzero(rank == r)
            self._add_round(
                slots[rows], obs[rows], action[rows], reward[rows], next_obs[rows], term[rows], trunc[rows]
            )

    def _slots(self, sid: np.ndarray) -> np.ndarray:
        new = [int(s) for s in np.unique(sid) if int(s) not in self._streams]
        if new:
            for s in new:
                self._streams[s] = len(self._streams)
            grow = len(self._streams) - len(self._w_len)
            self._w_obs = np.concatenate(
                [self._w_obs, np.zeros((grow, *self._w_obs.shape[1:]), self._w_obs.dtype)]
            )
            self._w_act = np.concatenate(
                [self._w_act, np.zeros((grow, *self._w_act.shape[1:]), self._w_act.dtype)]
            )
            self._w_rew = np.concatenate([self._w_rew, np.zeros((grow, self.n_step))])
            self._w_len = np.concatenate([self._w_len, np.zeros(grow, np.int64)])
        return np.fromiter((self._streams[int(s)] for s in sid), np.int64, len(sid))

    def _add_round(
        self,
        s: np.ndarray,
        obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        next_obs: np.ndarray,
        term: np.ndarray,
        trunc: np.ndarray,
    ) -> None:
        """One step for distinct streams `s`: append to their windows, write what is complete."""
        n = self.n_step
        pos = self._w_len[s]
        self._w_obs[s, pos] = obs
        self._w_act[s, pos] = action
        self._w_rew[s, pos] = reward
        self._w_len[s] += 1
        done = term | trunc
        full = ~done & (self._w_len[s] == n)
        if full.any():
            f = s[full]
            g = self._w_rew[f] @ self._powers[:n]
            disc = np.full(len(f), self._powers[n])
            self._write(
                self._w_obs[f, 0], self._w_act[f, 0], g, next_obs[full], term[full], trunc[full], disc
            )
            self._drop_oldest(f)
        for i in np.flatnonzero(done):
            self._end_episode(int(s[i]), next_obs[i : i + 1], bool(term[i]), bool(trunc[i]))

    def _add_one(
        self,
        w: int,
        obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        next_obs: np.ndarray,
        term: np.ndarray,
        trunc: np.ndarray,
    ) -> None:
        """`_add_round` for one row of one stream (window `w`), with scalar indexing: the one-env
        case, where fancy indexing would cost more than the step itself."""
        n, k = self.n_step, int(self._w_len[w])
        self._w_obs[w, k], self._w_act[w, k], self._w_rew[w, k] = obs[0], action[0], reward[0]
        self._w_len[w] = k + 1
        if term[0] or trunc[0]:
            self._end_episode(w, next_obs, bool(term[0]), bool(trunc[0]))
        elif k + 1 == n:
            g = self._w_rew[w] @ self._powers[:n]
            self._write(
                self._w_obs[w, :1], self._w_act[w, :1], np.array([g]), next_obs, term, trunc, self._powers[n:]
            )
            self._drop_oldest(w)

    def _drop_oldest(self, windows: int | np.ndarray) -> None:
        """Shift full windows by one step once their oldest step is written."""
        self._w_obs[windows, :-1] = self._w_obs[windows, 1:]
        self._w_act[windows, :-1] = self._w_act[windows, 1:]
        self._w_rew[windows, :-1] = self._w_rew[windows, 1:]
        self._w_len[windows] -= 1

    def _end_episode(self, w: int, next_obs: np.ndarray, term: bool, trunc: bool) -> None:
        """An episode ended in window `w` (`next_obs`: its final observation, one row): every
        suffix of the window is written, and the window empties."""
        k = int(self._w_len[w])
        rew = self._w_rew[w, :k]
        g = np.array([rew[j:] @ self._powers[: k - j] for j in range(k)])
        disc = self._powers[k - np.arange(k)]
        self._write(
            self._w_obs[w, :k],
            self._w_act[w, :k],
            g,
            np.repeat(next_obs, k, axis=0),
            np.full(k, term),
            np.full(k, trunc),
            disc,
        )
        self._w_len[w] = 0

    def _write(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        next_obs: np.ndarray,
        term: np.ndarray,
        trunc: np.ndarray,
        discount: np.ndarray,
    ) -> None:
        b = len(reward)
        if b > self.capacity:  # only the newest `capacity` rows survive anyway
            cut = b - self.capacity
            obs, action, reward, next_obs = obs[cut:], action[cut:], reward[cut:], next_obs[cut:]
            term, trunc, discount = term[cut:], trunc[cut:], discount[cut:]
            self.added += cut
            b = self.capacity
        # A plain slice when the rows do not wrap (the common case): cheaper than fancy indexing.
        end = self.ptr + b
        idx: slice | np.ndarray = (
            slice(self.ptr, end) if end <= self.capacity else np.arange(self.ptr, end) % self.capacity
        )
        self.obs[idx] = obs
        self.next_obs[idx] = next_obs
        self.action[idx] = action
        self.reward[idx] = reward
        self.terminated[idx] = term
        self.truncated[idx] = trunc
        self.discount[idx] = discount
        if self.tree is not None:
            self.tree.set(np.arange(self.ptr, end) % self.capacity, np.full(b, self.max_priority**self.alpha))
        self.ptr = int((self.ptr + b) % self.capacity)
        self.size = min(self.size + b, self.capacity)
        self.added += b

    # ---------------------------------------------------------------------------- sampling
    def sample_indices(self, batch_size: int) -> np.ndarray:
        if self.size == 0:
            raise ReplayError("the replay buffer is empty; add transitions before sampling.")
        if self.tree is not None:
            return self.tree.sample(batch_size, self.rng)
        return self.rng.integers(0, self.size, batch_size)

    def sample(self, batch_size: int) -> ReplaySample:
        idx = self.sample_indices(batch_size)
        if self.tree is not None:
            probs = self.tree.get(idx) / self.tree.total
            weights = (self.size * probs) ** (-self.beta)
            weights = (weights / weights.max()).astype(np.float32)
        else:
            weights = np.ones(batch_size, np.float32)
        return ReplaySample(
            obs=self.obs[idx],
            action=self.action[idx],
            reward=self.reward[idx],
            next_obs=self.next_obs[idx],
            terminated=self.terminated[idx],
            truncated=self.truncated[idx],
            discount=self.discount[idx],
            weights=weights,
            indices=idx,
        )

    def sample_tensors(self, batch_size: int, count: int, device: torch.device) -> Iterator[TensorSample]:
        """`count` batches as tensors. Uniform: drawn at once and converted once (the buffer does not
        change during an update, so this is the same distribution). Prioritized: drawn lazily, one
        per step, so each sees the priorities the previous step wrote."""
        if self.tree is not None:
            for _ in range(count):
                yield self._tensors(self.sample(batch_size), device)
            return
        if count > 0:
            yield from self.sample_block(batch_size, count, device).split(batch_size)

    def sample_block(self, batch_size: int, count: int, device: torch.device) -> TensorSample:
        """`count` batches drawn at once as one sample (`split(batch_size)` gives them back).
        Importance weights are normalised over the whole block, so prioritized callers take count = 1."""
        return self._tensors(self.sample(batch_size * count), device)

    @staticmethod
    def _tensors(s: ReplaySample, device: torch.device) -> TensorSample:
        def t(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x)).to(device, non_blocking=True)

        return TensorSample(
            t(s.obs),
            t(s.action),
            t(s.reward),
            t(s.next_obs),
            t((~s.terminated).astype(np.float32)),
            t(s.discount),
            t(s.weights),
            s.indices,
        )

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """New priorities p = (|δ| + ε)^α for sampled transitions (no-op for a uniform buffer)."""
        if self.tree is None:
            return
        raw = np.abs(np.asarray(td_errors, dtype=np.float64)) + self.priority_eps
        raw = np.where(np.isfinite(raw), raw, self.max_priority)
        self.tree.set(np.asarray(indices), raw**self.alpha)
        self.max_priority = max(self.max_priority, float(raw.max()))

    # ------------------------------------------------------------------------ save / restore
    def _chronological(self) -> np.ndarray:
        if self.size < self.capacity:
            return np.arange(self.size)
        return (self.ptr + np.arange(self.capacity)) % self.capacity

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (safe for `torch.load(weights_only=True)`), oldest row first."""
        order = self._chronological()
        t = torch.from_numpy
        state: dict[str, Any] = {
            "capacity": self.capacity,
            "ptr": self.ptr,
            "n_step": self.n_step,
            "gamma": self.gamma,
            "added": self.added,
            "max_priority": self.max_priority,
            "obs": t(self.obs[order]),
            "next_obs": t(self.next_obs[order]),
            "action": t(self.action[order]),
            "reward": t(self.reward[order]),
            "terminated": t(self.terminated[order]),
            "truncated": t(self.truncated[order]),
            "discount": t(self.discount[order]),
            "streams": [[k, v] for k, v in self._streams.items()],
            "w_obs": t(self._w_obs.copy()),
            "w_act": t(self._w_act.copy()),
            "w_rew": t(self._w_rew.copy()),
            "w_len": t(self._w_len.copy()),
            "rng": generator_state(self.rng),
        }
        if self.tree is not None:
            state["priorities"] = t(self.tree.leaves()[order].copy())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved buffer; a smaller capacity keeps the newest rows."""

        def arr(key: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
            value = state[key]
            a = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if a.shape[1:] != shape:
                raise ReplayError(f"saved replay field '{key}' has shape {a.shape[1:]}, expected {shape}.")
            return a.astype(dtype, copy=False)

        try:
            fields = {
                "obs": arr("obs", self.obs_dtype, self.obs_shape),
                "next_obs": arr("next_obs", self.obs_dtype, self.obs_shape),
                "action": arr("action", self.action_dtype, self.action_shape),
                "reward": arr("reward", np.float32, ()),
                "terminated": arr("terminated", np.bool_, ()),
                "truncated": arr("truncated", np.bool_, ()),
                "discount": arr("discount", np.float32, ()),
            }
        except KeyError as exc:
            raise ReplayError(f"saved replay buffer lacks field {exc}; it is damaged.") from None
        lengths = {len(v) for v in fields.values()}
        if len(lengths) != 1:
            raise ReplayError("saved replay fields have different lengths; the buffer is damaged.")
        if int(state.get("n_step", 1)) != self.n_step or float(state.get("gamma", self.gamma)) != self.gamma:
            log.warning("replay buffer was saved with other n_step/gamma; its returns keep their old values")
        count = lengths.pop()
        keep = min(count, self.capacity)
        # Same capacity and full: put rows back where they were, so sampling resumes exactly.
        self.ptr = int(state.get("ptr", 0)) % self.capacity if keep == self.capacity == count else 0
        pos = (self.ptr + np.arange(keep)) % self.capacity
        for name, values in fields.items():
            getattr(self, name)[pos] = values[count - keep :]
        self.size = keep
        self.ptr = (self.ptr + keep) % self.capacity
        self.added = int(state.get("added", keep))
        self.max_priority = float(state.get("max_priority", 1.0))
        if self.tree is not None:
            self.tree.tree[:] = 0.0
            if "priorities" in state:
                pri = np.asarray(
                    state["priorities"].numpy()
                    if isinstance(state["priorities"], torch.Tensor)
                    else state["priorities"],
                    dtype=np.float64,
                )[count - keep :]
            else:
                pri = np.full(keep, self.max_priority**self.alpha)
            self.tree.tree[self.tree.size + pos] = pri
            self.tree.rebuild()
        if "rng" in state:
            set_generator_state(self.rng, state["rng"])
        w_obs = state.get("w_obs")
        if self.n_step > 1 and w_obs is not None and tuple(w_obs.shape[1:]) == self._w_obs.shape[1:]:
            self._streams = {int(k): int(v) for k, v in state["streams"]}
            self._positional = {}
            self._w_obs = state["w_obs"].numpy().astype(self.obs_dtype)
            self._w_act = state["w_act"].numpy().astype(self.action_dtype)
            self._w_rew = state["w_rew"].numpy().astype(np.float64)
            self._w_len = state["w_len"].numpy().astype(np.int64)
