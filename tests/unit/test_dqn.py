"""DQN: replay-ratio scheduling, targets, dueling head, priorities, save/load, a tiny learning task."""

from __future__ import annotations

import concurrent.futures
import copy
import io
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from tether.algos.base import Transitions
from tether.algos.dqn import Config, QNetwork, build
from tether.algos.optim import clip_grad_norm, flush_denormals
from tether.config import ConfigError

OBS = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
ACT = gym.spaces.Discrete(3)


def _batch(rng: np.random.Generator, n: int, obs_dim: int = 4) -> Transitions:
    return Transitions(
        rng.normal(size=(n, obs_dim)).astype(np.float32),
        rng.integers(0, 3, n),
        rng.normal(size=n).astype(np.float32),
        rng.normal(size=(n, obs_dim)).astype(np.float32),
        rng.random(n) < 0.2,
        np.zeros(n, bool),
    )


def _dqn(**overrides):
    base = dict(batch_size=8, learning_starts=0, net_arch=[16], epsilon_decay_steps=100)
    base.update(overrides)
    return build(Config(**base), OBS, ACT, "cpu", seed=0)


def test_ready_follows_learning_starts_and_train_freq() -> None:
    dqn = _dqn(learning_starts=20, train_freq=5, gradient_steps=3)
    rng = np.random.default_rng(0)
    dqn.observe(_batch(rng, 18))
    assert not dqn.ready()  # still collecting
    dqn.observe(_batch(rng, 6))  # 24 observed: 4 past learning_starts
    assert not dqn.ready()
    dqn.observe(_batch(rng, 1))
    assert dqn.ready()
    dqn.update()
    assert dqn.grad_steps == 3 and not dqn.ready()
    # A large remote batch keeps the replay ratio: 50 transitions → 10 rounds × 3 steps.
    dqn.observe(_batch(rng, 50))
    dqn.update()
    assert dqn.grad_steps == 33


def test_epsilon_schedule_and_greedy_acting() -> None:
    dqn = _dqn(epsilon_start=1.0, epsilon_end=0.1, epsilon_decay_steps=100)
    assert dqn.epsilon == pytest.approx(1.0)
    obs = np.random.default_rng(1).normal(size=(500, 4)).astype(np.float32)
    actions = dqn.act(obs).action
    assert set(actions.tolist()) == {0, 1, 2}
    dqn.observe(_batch(np.random.default_rng(2), 50))
    assert dqn.epsilon == pytest.approx(0.55)
    greedy = dqn.policy()(torch.as_tensor(obs)).argmax(1).numpy()
    np.testing.assert_array_equal(dqn.act(obs, explore=False).action, greedy)
    dqn.observe(_batch(np.random.default_rng(3), 100))
    assert dqn.epsilon == pytest.approx(0.1)
    explored = dqn.act(obs).action
    assert 0.02 < np.mean(explored != greedy) < 0.15  # ≈ ε · 2/3 of actions differ


@pytest.mark.parametrize("double_q", [True, False])
def test_first_update_regresses_towards_the_reference_target(double_q: bool) -> None:
    """One plain-SGD-like step must move Q(s,a) towards y computed by hand from the networks."""
    dqn = _dqn(double_q=double_q, batch_size=32, learning_rate=1e-3, train_freq=32, n_step=1, loss="mse")
    rng = np.random.default_rng(4)
    batch = _batch(rng, 32)
    dqn.observe(batch)
    q0 = copy.deepcopy(dqn.q)
    with torch.no_grad():
        nxt = torch.as_tensor(batch.next_obs)
        if double_q:
            best = q0(nxt).argmax(1, keepdim=True)
            next_v = dqn.q_target(nxt).gather(1, best).squeeze(1)
        else:
            next_v = dqn.q_target(nxt).max(1).values
        y = torch.as_tensor(batch.reward) + 0.99 * (1 - torch.as_tensor(batch.terminated).float()) * next_v
        before = (
            q0(torch.as_tensor(batch.obs)).gather(1, torch.as_tensor(batch.action).unsqueeze(1)).squeeze(1)
        )
        err_before = ((before - y) ** 2).mean()
    dqn.buffer.sample = lambda n: _full_sample(dqn, n)  # the whole batch, in order
    metrics = dqn.update()
    assert metrics["loss"] == pytest.approx(float(err_before), rel=1e-5)
    with torch.no_grad():
        after = (
            dqn.q(torch.as_tensor(batch.obs)).gather(1, torch.as_tensor(batch.action).unsqueeze(1)).squeeze(1)
        )
    assert ((after - y) ** 2).mean() < err_before


def _full_sample(dqn, n):
    buf = dqn.buffer
    idx = np.arange(n)
    from tether.buffers.replay import ReplaySample

    return ReplaySample(
        buf.obs[idx],
        buf.action[idx],
        buf.reward[idx],
        buf.next_obs[idx],
        buf.terminated[idx],
        buf.truncated[idx],
        buf.discount[idx],
        np.ones(n, np.float32),
        idx,
    )


def test_target_network_hard_and_polyak_updates() -> None:
    rng = np.random.default_rng(5)
    hard = _dqn(target_update_interval=4, tau=1.0, train_freq=1)
    hard.observe(_batch(rng, 3))
    hard.update()  # 3 gradient steps: no sync yet
    assert not all(
        torch.equal(a, b) for a, b in zip(hard.q.parameters(), hard.q_target.parameters(), strict=True)
    )
    hard.observe(_batch(rng, 1))
    hard.update()  # 4th step syncs
    assert all(
        torch.equal(a, b) for a, b in zip(hard.q.parameters(), hard.q_target.parameters(), strict=True)
    )

    soft = _dqn(target_update_interval=1, tau=0.1, train_freq=1)
    before = [p.detach().clone() for p in soft.q_target.parameters()]
    soft.observe(_batch(rng, 1))
    soft.update()
    for t0, t1, q in zip(before, soft.q_target.parameters(), soft.q.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * q.detach())


def test_dueling_head_centres_advantages() -> None:
    net = QNetwork(OBS, 3, [16, 16], "relu", dueling=True)
    obs = torch.randn(10, 4)
    h = net.trunk(net.encoder(obs))
    q = net(obs)
    torch.testing.assert_close(q.mean(1, keepdim=True), net.value(h))
    with pytest.raises(ConfigError):
        QNetwork(OBS, 3, [], "relu", dueling=True)


def test_prioritized_replay_updates_priorities_from_td_errors() -> None:
    dqn = _dqn(prioritized=True, train_freq=16, batch_size=16)
    dqn.observe(_batch(np.random.default_rng(6), 16))
    assert np.allclose(dqn.buffer.tree.leaves()[:16], 1.0)
    metrics = dqn.update()
    leaves = dqn.buffer.tree.leaves()[:16]
    assert not np.allclose(leaves, 1.0)
    assert "per_beta" in metrics


def test_discrete_observations_are_one_hot_encoded() -> None:
    dqn = build(Config(learning_starts=0, batch_size=4, net_arch=[8]), gym.spaces.Discrete(5), ACT, "cpu", 0)
    assert dqn.act(np.array([0, 4, 2]), explore=False).action.shape == (3,)
    dqn.observe(
        Transitions(
            np.array([0, 1, 2, 3]),
            np.array([0, 1, 2, 0]),
            np.ones(4),
            np.array([1, 2, 3, 4]),
            np.zeros(4, bool),
            np.zeros(4, bool),
        )
    )
    assert np.isfinite(dqn.update()["loss"])


def test_save_load_gives_identical_actions_and_training() -> None:
    rng = np.random.default_rng(7)
    dqn = _dqn(n_step=3, prioritized=True, dueling=True, net_arch=[16, 16])
    for _ in range(5):
        dqn.observe(_batch(rng, 8))
        dqn.update()
    raw = io.BytesIO()
    torch.save(dqn.state_dict(), raw)
    raw.seek(0)
    other = _dqn(n_step=3, prioritized=True, dueling=True, net_arch=[16, 16])
    other.load_state_dict(torch.load(raw, weights_only=True))
    obs = rng.normal(size=(32, 4)).astype(np.float32)
    np.testing.assert_array_equal(dqn.act(obs).action, other.act(obs).action)  # same ε draws too
    batch = _batch(rng, 8)
    dqn.observe(batch)
    other.observe(batch)
    assert dqn.update() == other.update()
    for a, b in zip(dqn.q.parameters(), other.q.parameters(), strict=True):
        assert torch.equal(a, b)


def test_learns_a_contextual_bandit_from_observed_batches_only() -> None:
    """Two contexts, the rewarded action is the context's index; one-step episodes."""
    space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    dqn = build(
        Config(
            learning_starts=64,
            batch_size=32,
            train_freq=4,
            learning_rate=1e-2,
            net_arch=[16],
            epsilon_decay_steps=500,
            target_update_interval=10,
        ),
        space,
        gym.spaces.Discrete(2),
        "cpu",
        0,
    )
    rng = np.random.default_rng(8)
    eye = np.eye(2, dtype=np.float32)
    for _ in range(150):
        ctx = rng.integers(0, 2, 4)
        action = dqn.act(eye[ctx]).action
        reward = (action == ctx).astype(np.float32)
        dqn.observe(Transitions(eye[ctx], action, reward, eye[ctx], np.ones(4, bool), np.zeros(4, bool)))
        if dqn.ready():
            dqn.update()
    np.testing.assert_array_equal(dqn.act(eye, explore=False).action, [0, 1])
    q = dqn.policy()(torch.as_tensor(eye))
    assert abs(float(q[0, 0]) - 1.0) < 0.2 and abs(float(q[1, 1]) - 1.0) < 0.2


def test_build_refuses_continuous_actions() -> None:
    with pytest.raises(ConfigError):
        build(Config(), OBS, gym.spaces.Box(-1, 1, (2,)), "cpu", 0)


def test_learning_rate_anneals_linearly_and_follows_live_changes() -> None:
    cfg = Config(batch_size=8, learning_starts=0, net_arch=[8], learning_rate=1e-3, anneal_lr=True)
    dqn = build(cfg, OBS, ACT, "cpu", seed=0, total_steps=100)
    dqn.observe(_batch(np.random.default_rng(9), 40))
    metrics = dqn.update()
    assert metrics["learning_rate"] == pytest.approx(6e-4)
    assert dqn.optimizer.param_groups[0]["lr"] == pytest.approx(6e-4)
    # The trainer applies live changes by swapping the config; the next update uses them.
    dqn.config = cfg.model_copy(update={"learning_rate": 1e-2, "anneal_lr": False})
    dqn.observe(_batch(np.random.default_rng(10), 8))
    dqn.update()
    assert dqn.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)


def _reference_step(dqn, b) -> None:
    """One DQN gradient step as written per step: target from Q_target, Huber loss, clip, Adam."""
    c = dqn.config
    with torch.no_grad():
        next_q_target = dqn.q_target(b.next_obs)
        if c.double_q:
            next_q = next_q_target.gather(1, dqn.q(b.next_obs).argmax(1, keepdim=True)).squeeze(1)
        else:
            next_q = next_q_target.max(1).values
        target = b.reward + b.discount * b.not_done * next_q
    q = dqn.q(b.obs).gather(1, b.action.long().unsqueeze(1)).squeeze(1)
    loss = torch.nn.functional.smooth_l1_loss(q, target)
    dqn.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(dqn.q.parameters(), c.max_grad_norm)
    dqn.optimizer.step()
    dqn.grad_steps += 1
    if dqn.grad_steps % c.target_update_interval == 0:
        dqn.q_target.load_state_dict(dqn.q.state_dict())


@pytest.mark.parametrize("double_q", [False, True])
def test_targets_computed_per_target_sync_block_match_per_step_targets(double_q: bool) -> None:
    # Targets are computed once for all steps up to the next target sync, on distinct rows only;
    # the weights must come out as if every step had computed its own target.
    dqn = _dqn(
        train_freq=40,
        gradient_steps=6,
        target_update_interval=3,
        double_q=double_q,
        learning_rate=0.05,  # large enough that a stale target would show
        max_grad_norm=0.5,
    )
    dqn.observe(_batch(np.random.default_rng(3), 40))  # a small buffer: sampled rows repeat
    reference = copy.deepcopy(dqn)
    dqn.update()
    for _ in range(2):  # two blocks of 3 steps, drawn as the learner draws them
        for b in reference.buffer.sample_tensors(8, 3, reference.device):
            _reference_step(reference, b)
    assert dqn.grad_steps == reference.grad_steps == 6
    for ours, theirs in zip(dqn.q.state_dict().values(), reference.q.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs)
    for ours, theirs in zip(dqn.q_target.parameters(), reference.q_target.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_clip_grad_norm_matches_torch() -> None:
    grads = [torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) * 10, torch.ones(3)]
    ours = [torch.zeros_like(g, requires_grad=True) for g in grads]
    theirs = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for a, b, g in zip(ours, theirs, grads, strict=True):
        a.grad, b.grad = g.clone(), g.clone()
    clip_grad_norm(ours, 1.0)
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_flush_denormals_is_scoped() -> None:
    tiny = torch.tensor([1e-40])
    with flush_denormals():
        with flush_denormals():  # an inner block leaves the outer one flushing
            pass
        assert float(tiny * 1.0) == 0.0
    assert float(tiny * 1.0) > 0.0


def _parallel_op_flushes_inside_only() -> None:
    tiny = torch.full((1_000_000,), 1e-40)
    tiny.mul(1.0)  # start this thread's OpenMP team with the flag off
    with flush_denormals():
        assert int(tiny.mul(1.0).count_nonzero()) == 0
    assert int(tiny.mul(1.0).count_nonzero()) == tiny.numel()  # and off again everywhere


@pytest.mark.skipif(sys.platform != "linux", reason="the OpenMP team is found through /proc/self/maps")
def test_flush_denormals_reaches_every_thread_of_a_parallel_op() -> None:
    """PyTorch's own flag reaches only the calling thread, and OpenMP's threads were started
    before it: without sharing it, the other threads' share of a parallel op keeps subnormals.
    Also from a thread other than the main one (the MQTT server learns on its own thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _parallel_op_flushes_inside_only()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(_parallel_op_flushes_inside_only).result()
    finally:
        torch.set_num_threads(threads)
