"""Replay memory: n-step returns and priorities against plain-Python references, sum-tree
sampling proportions, wraparound, save/restore."""

from __future__ import annotations

import io

import gymnasium as gym
import numpy as np
import pytest
import torch

from tether.algos.base import Transitions
from tether.buffers.replay import ReplayBuffer, ReplayError
from tether.buffers.sumtree import SumTree


def _batch(obs, action, reward, next_obs, term, trunc, **extras) -> Transitions:
    return Transitions(
        np.asarray(obs, np.float32),
        np.asarray(action),
        np.asarray(reward, np.float32),
        np.asarray(next_obs, np.float32),
        np.asarray(term, bool),
        np.asarray(trunc, bool),
        {k: np.asarray(v) for k, v in extras.items()},
    )


def _reference_nstep(episodes: list[list[tuple]], gamma: float, n: int) -> list[tuple]:
    """Plain-Python n-step transitions: for each step t of an episode of (s, a, r, s2, term, trunc)
    steps, sum rewards up to n steps or the episode end, bootstrapping from the last step's s2."""
    out = []
    for ep in episodes:
        for t in range(len(ep)):
            g, k = 0.0, 0
            while k < n and t + k < len(ep):
                g += gamma**k * ep[t + k][2]
                k += 1
            last = ep[t + k - 1]
            complete = k == n or last[4] or last[5]
            if complete:
                out.append((ep[t][0], ep[t][1], g, last[3], last[4], last[5], gamma**k))
    return out


def _rows(buf: ReplayBuffer) -> list[tuple]:
    order = buf._chronological()
    return [
        (
            float(buf.obs[i, 0]),
            int(buf.action[i]),
            float(buf.reward[i]),
            float(buf.next_obs[i, 0]),
            bool(buf.terminated[i]),
            bool(buf.truncated[i]),
            float(buf.discount[i]),
        )
        for i in order
    ]


def _random_episodes(rng: np.random.Generator, num_envs: int, steps: int) -> list[list[list[tuple]]]:
    """Per env, a list of episodes of (s, a, r, s2, term, trunc); the last may be unfinished."""
    per_env: list[list[list[tuple]]] = [[[]] for _ in range(num_envs)]
    counter = 0
    for _ in range(steps):
        for e in range(num_envs):
            term, trunc = bool(rng.random() < 0.1), bool(rng.random() < 0.05)
            trunc = trunc and not term
            s = float(counter)
            counter += 1
            per_env[e][-1].append((s, int(rng.integers(3)), float(rng.normal()), s + 0.5, term, trunc))
            if term or trunc:
                per_env[e].append([])
    return per_env


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("num_envs", [1, 3])  # one env takes the buffer's single-row path
def test_nstep_transitions_match_plain_python_reference(n: int, num_envs: int) -> None:
    gamma, steps = 0.9, 60
    episodes = _random_episodes(np.random.default_rng(n), num_envs, steps)
    buf = ReplayBuffer(10_000, (1,), n_step=n, gamma=gamma)
    # Feed as a vector env would: one row per env per step.
    flat = [[step for ep in eps for step in ep] for eps in episodes]
    for t in range(steps):
        rows = [flat[e][t] for e in range(num_envs)]
        buf.add(
            _batch(
                *[[[r[0]] for r in rows]],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [[r[3]] for r in rows],
                [r[4] for r in rows],
                [r[5] for r in rows],
            )
        )
    expected = [tr for eps in episodes for tr in _reference_nstep(eps, gamma, n)]
    got = _rows(buf)
    key = lambda r: r[0]  # noqa: E731 — obs values are unique
    assert len(got) == len(expected)
    for g, e in zip(sorted(got, key=key), sorted(expected, key=key), strict=True):
        assert g[:2] == e[:2] and g[3:6] == e[3:6]
        assert g[2] == pytest.approx(e[2], rel=1e-5, abs=1e-5)
        assert g[6] == pytest.approx(e[6], rel=1e-6)


def test_nstep_streams_from_extras_keep_each_device_in_order() -> None:
    """A remote batch carries several consecutive steps of two devices, interleaved."""
    gamma = 0.5
    buf = ReplayBuffer(100, (1,), n_step=2, gamma=gamma)
    # device 7: 0 -> 1 -> 2 (terminal); device 9: 10 -> 11 (truncated)
    buf.add(
        _batch(
            [[0], [10], [1], [11], [2]],
            [0, 1, 0, 1, 0],
            [1, 10, 2, 20, 4],
            [[1], [11], [2], [12], [3]],
            [0, 0, 0, 0, 1],
            [0, 0, 0, 1, 0],
            stream=[7, 9, 7, 9, 7],
        )
    )
    rows = {r[0]: r for r in _rows(buf)}
    assert rows[0.0][2:] == (1 + 0.5 * 2, 2.0, False, False, 0.25)
    assert rows[1.0][2:] == (2 + 0.5 * 4, 3.0, True, False, 0.25)
    assert rows[2.0][2:] == (4.0, 3.0, True, False, 0.5)
    assert rows[10.0][2:] == (10 + 0.5 * 20, 12.0, False, True, 0.25)
    assert rows[11.0][2:] == (20.0, 12.0, False, True, 0.5)
    assert len(rows) == 5


def test_wraparound_keeps_the_newest_rows_in_order() -> None:
    buf = ReplayBuffer(5, (1,))
    for start in range(0, 12, 3):
        vals = np.arange(start, start + 3)
        buf.add(_batch(vals[:, None], vals % 2, vals, vals[:, None] + 1, np.zeros(3), np.zeros(3)))
    assert len(buf) == 5 and buf.added == 12
    assert [r[0] for r in _rows(buf)] == [7.0, 8.0, 9.0, 10.0, 11.0]
    # A batch larger than the capacity keeps only its tail.
    vals = np.arange(100, 113)
    buf.add(_batch(vals[:, None], vals % 2, vals, vals[:, None], np.zeros(13), np.zeros(13)))
    assert [r[0] for r in _rows(buf)] == [108.0, 109.0, 110.0, 111.0, 112.0]
    samples = buf.sample(64)
    assert set(samples.obs[:, 0].tolist()) <= {108.0, 109.0, 110.0, 111.0, 112.0}
    np.testing.assert_array_equal(samples.reward, samples.obs[:, 0])


def test_sumtree_sampling_proportions_chi_square() -> None:
    rng = np.random.default_rng(1234)
    tree = SumTree(37)  # not a power of two: padding leaves must never be drawn
    priorities = rng.uniform(0.0, 5.0, 37)
    priorities[[3, 20]] = 0.0
    tree.set(np.arange(37), priorities)
    assert tree.total == pytest.approx(priorities.sum())
    draws = np.concatenate([tree.sample(256, rng) for _ in range(400)])
    counts = np.bincount(draws, minlength=37)
    assert counts[[3, 20]].sum() == 0 and len(counts) == 37
    expected = priorities / priorities.sum() * len(draws)
    mask = expected > 0
    chi2 = float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())
    # 34 degrees of freedom: the 99.9% quantile is about 65. Stratified sampling is tighter still.
    assert chi2 < 65.0


def test_sumtree_find_matches_cumulative_sum_reference() -> None:
    rng = np.random.default_rng(5)
    p = rng.uniform(0, 1, 100)
    tree = SumTree(100)
    tree.set(np.arange(100), p)
    values = rng.uniform(0, p.sum(), 1000)
    expected = np.searchsorted(np.cumsum(p), values, side="right")
    np.testing.assert_array_equal(tree.find(values), expected)
    # Repeated indices in one update: the last value wins and the sums stay exact.
    tree.set(np.array([4, 4, 9]), np.array([7.0, 2.0, 0.5]))
    p[4], p[9] = 2.0, 0.5
    assert tree.total == pytest.approx(p.sum())


def test_priorities_and_weights_match_reference() -> None:
    alpha, beta, eps = 0.6, 0.4, 1e-6
    buf = ReplayBuffer(
        8, (1,), prioritized=True, alpha=alpha, beta_start=beta, beta_end=beta, priority_eps=eps
    )
    vals = np.arange(8)
    buf.add(_batch(vals[:, None], vals % 2, vals, vals[:, None], np.zeros(8), np.zeros(8)))
    # New rows all get the max priority (1.0 initially).
    np.testing.assert_allclose(buf.tree.leaves(), np.ones(8))
    td = np.array([0.5, -2.0, 0.0, 1.0, 3.0, -0.1, 0.2, 4.0])
    buf.update_priorities(np.arange(8), td)
    ref = [(abs(x) + eps) ** alpha for x in td]
    np.testing.assert_allclose(buf.tree.leaves(), ref)
    assert buf.max_priority == pytest.approx(4.0 + eps)
    sample = buf.sample(16)
    total = sum(ref)
    w = [(8 * ref[i] / total) ** -beta for i in sample.indices]
    np.testing.assert_allclose(sample.weights, np.array(w) / max(w), rtol=1e-5)
    # A new row enters at the max priority seen so far.
    buf.add(_batch([[9]], [1], [9], [[9]], [0], [0]))
    assert buf.tree.get(np.array([0]))[0] == pytest.approx((4.0 + eps) ** alpha)


def test_beta_anneals_with_added_transitions() -> None:
    buf = ReplayBuffer(100, (1,), prioritized=True, beta_start=0.4, beta_end=1.0, beta_steps=10)
    assert buf.beta == pytest.approx(0.4)
    buf.add(
        _batch(np.zeros((5, 1)), np.zeros(5, int), np.zeros(5), np.zeros((5, 1)), np.zeros(5), np.zeros(5))
    )
    assert buf.beta == pytest.approx(0.7)
    buf.add(
        _batch(
            np.zeros((20, 1)), np.zeros(20, int), np.zeros(20), np.zeros((20, 1)), np.zeros(20), np.zeros(20)
        )
    )
    assert buf.beta == pytest.approx(1.0)


@pytest.mark.parametrize("prioritized", [False, True])
def test_save_restore_round_trip_through_weights_only_load(prioritized: bool) -> None:
    space = gym.spaces.Box(-1, 1, (3,))
    buf = ReplayBuffer.for_spaces(
        50, space, gym.spaces.Box(-1, 1, (2,)), n_step=3, prioritized=prioritized, seed=3
    )
    rng = np.random.default_rng(0)
    for _ in range(30):
        buf.add(
            _batch(
                rng.normal(size=(2, 3)),
                rng.normal(size=(2, 2)),
                rng.normal(size=2),
                rng.normal(size=(2, 3)),
                rng.random(2) < 0.1,
                np.zeros(2),
            )
        )
    if prioritized:
        buf.update_priorities(np.arange(10), rng.normal(size=10))
    raw = io.BytesIO()
    torch.save(buf.state_dict(), raw)
    raw.seek(0)
    other = ReplayBuffer.for_spaces(50, space, gym.spaces.Box(-1, 1, (2,)), n_step=3, prioritized=prioritized)
    other.load_state_dict(torch.load(raw, weights_only=True))
    assert len(other) == len(buf) == 50
    np.testing.assert_array_equal(other.obs[other._chronological()], buf.obs[buf._chronological()])
    # Same RNG state and priorities → the same samples, and pending n-step windows carry over.
    a, b = buf.sample(32), other.sample(32)
    np.testing.assert_array_equal(a.obs, b.obs)
    np.testing.assert_allclose(a.weights, b.weights)
    nxt = _batch(np.ones((2, 3)), np.ones((2, 2)), np.ones(2), np.ones((2, 3)), np.ones(2), np.zeros(2))
    buf.add(nxt)
    other.add(nxt)
    np.testing.assert_array_equal(buf.reward[buf._chronological()], other.reward[other._chronological()])
    # A smaller buffer keeps the newest rows.
    small = ReplayBuffer.for_spaces(10, space, gym.spaces.Box(-1, 1, (2,)), n_step=3, prioritized=prioritized)
    small.load_state_dict(buf.state_dict())
    np.testing.assert_array_equal(small.obs[small._chronological()], buf.obs[buf._chronological()][-10:])


def test_rejects_batches_that_do_not_fit() -> None:
    buf = ReplayBuffer(10, (4,))
    good = dict(
        obs=np.zeros((2, 4)),
        action=[0, 1],
        reward=[0, 0],
        next_obs=np.zeros((2, 4)),
        term=[0, 0],
        trunc=[0, 0],
    )
    with pytest.raises(ReplayError):
        buf.add(_batch(**{**good, "obs": np.zeros((2, 3))}))
    with pytest.raises(ReplayError):
        buf.add(_batch(**{**good, "reward": [0.0, float("nan")]}))
    with pytest.raises(ReplayError):
        buf.add(_batch(**{**good, "next_obs": np.full((2, 4), np.inf)}))
    with pytest.raises(ReplayError):
        buf.add(_batch(**{**good, "action": [0, 1, 2]}))
    assert len(buf) == 0
    with pytest.raises(ReplayError):
        buf.sample(4)
    buf.add(_batch(**good))
    assert len(buf) == 2


def test_nbytes_counts_preallocated_memory() -> None:
    buf = ReplayBuffer(1000, (8,), prioritized=True)
    # obs + next_obs (2 × 8 × 4) + action 8 + reward 4 + term 1 + trunc 1 + discount 4, + the tree
    assert buf.nbytes == 1000 * (64 + 8 + 4 + 1 + 1 + 4) + 2 * 1024 * 8
    assert "MiB" in buf.describe()


def test_nstep_warns_when_batch_sizes_change_without_streams(caplog: pytest.LogCaptureFixture) -> None:
    buf = ReplayBuffer(100, (1,), n_step=3)
    buf.add(_batch(np.zeros((2, 1)), [0, 0], [0, 0], np.zeros((2, 1)), [0, 0], [0, 0]))
    assert not caplog.records
    buf.add(_batch(np.zeros((5, 1)), [0] * 5, [0] * 5, np.zeros((5, 1)), [0] * 5, [0] * 5))
    assert "extras['stream']" in caplog.text
