import gymnasium as gym
import numpy as np
import pytest
import torch

from tether.algos import Transitions
from tether.algos.ppo import Config, build
from tether.config import ConfigError


def _spaces(kind):
    obs = gym.spaces.Box(-5.0, 5.0, (4,), np.float32)
    act = gym.spaces.Box(-2.0, 2.0, (2,), np.float32) if kind == "box" else gym.spaces.Discrete(3)
    return obs, act


def _fill(learner, env_rows, steps, rng, with_extras=True, truncate_at=None):
    for t in range(steps):
        obs = rng.normal(size=(env_rows, 4)).astype(np.float32)
        out = learner.act(obs)
        truncated = np.zeros(env_rows, bool)
        if truncate_at is not None and t == truncate_at:
            truncated[0] = True
        batch = Transitions(
            obs,
            out.action,
            rng.normal(size=env_rows),
            rng.normal(size=(env_rows, 4)).astype(np.float32),
            np.zeros(env_rows, bool),
            truncated,
            out.extras if with_extras else {},
        )
        learner.observe(batch)


@pytest.mark.parametrize("kind", ["box", "discrete"])
def test_update_runs_and_policy_matches_deterministic_act(kind):
    rng = np.random.default_rng(0)
    obs_space, act_space = _spaces(kind)
    cfg = Config(rollout_steps=16, batch_size=32, num_epochs=2, actor_fc_layers=[16], value_fc_layers=[16])
    learner = build(cfg, obs_space, act_space, "cpu", seed=1, num_envs=4)
    _fill(learner, 4, 16, rng, truncate_at=3)
    assert learner.ready()
    metrics = learner.update()
    assert np.isfinite([metrics["policy_loss"], metrics["value_loss"], metrics["entropy"]]).all()
    assert not learner.ready()
    obs = rng.normal(size=(10, 4)).astype(np.float32) * 3
    det = learner.act(obs, explore=False).action
    with torch.no_grad():
        exported = learner.policy()(torch.as_tensor(obs)).numpy()
    np.testing.assert_allclose(exported, det, rtol=0, atol=0)
    if kind == "box":
        assert (det >= -2.0).all() and (det <= 2.0).all()
        sampled = learner.act(obs).action
        assert (sampled >= -2.0).all() and (sampled <= 2.0).all()


def test_save_load_gives_identical_actions_and_updates():
    rng = np.random.default_rng(3)
    obs_space, act_space = _spaces("box")
    cfg = Config(rollout_steps=8, batch_size=16, num_epochs=1, actor_fc_layers=[8], value_fc_layers=[8])
    a = build(cfg, obs_space, act_space, "cpu", seed=5, num_envs=2)
    _fill(a, 2, 8, rng)
    a.update()
    b = build(cfg, obs_space, act_space, "cpu", seed=99, num_envs=2)
    b.load_state_dict(a.state_dict())
    obs = rng.normal(size=(6, 4)).astype(np.float32)
    np.testing.assert_array_equal(a.act(obs, explore=False).action, b.act(obs, explore=False).action)
    # Same data after restore → same update (optimiser state and minibatch RNG restored too).
    data_rng_a, data_rng_b = np.random.default_rng(7), np.random.default_rng(7)
    torch.manual_seed(0)
    _fill(a, 2, 8, data_rng_a)
    torch.manual_seed(0)
    _fill(b, 2, 8, data_rng_b)
    a.update()
    b.update()
    for pa, pb in zip(a.net.parameters(), b.net.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_remote_batches_without_logp_or_value_are_learned_from():
    rng = np.random.default_rng(1)
    obs_space, act_space = _spaces("box")
    cfg = Config(rollout_steps=8, batch_size=16, num_epochs=3, actor_fc_layers=[8], value_fc_layers=[8])
    learner = build(cfg, obs_space, act_space, "cpu", seed=0, num_envs=2)
    before = [p.detach().clone() for p in learner.net.parameters()]
    _fill(learner, 2, 8, rng, with_extras=False, truncate_at=2)
    metrics = learner.update()
    # On-policy treatment of data without log-probs: the first minibatch starts at ratio 1.
    assert metrics["approx_kl"] >= 0
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, learner.net.parameters(), strict=True))


def test_observation_normaliser_moves_between_rollouts_and_is_inside_policy():
    rng = np.random.default_rng(2)
    obs_space, act_space = _spaces("box")
    cfg = Config(rollout_steps=4, batch_size=8, num_epochs=1, actor_fc_layers=[8], value_fc_layers=[8])
    learner = build(cfg, obs_space, act_space, "cpu", seed=0, num_envs=2)
    _fill(learner, 2, 4, rng)
    assert learner.obs_norm is not None
    assert torch.all(learner.obs_norm.mean == 0)
    learner.update()
    assert not torch.all(learner.obs_norm.mean == 0)
    norm_keys = [k for k in learner.policy().state_dict() if k.startswith("norm.")]
    assert {"norm.mean", "norm.var"} <= set(norm_keys)


def test_angle_features_make_plus_and_minus_pi_one_heading():
    rng = np.random.default_rng(3)
    obs_space, act_space = _spaces("box")
    cfg = Config(rollout_steps=4, batch_size=8, num_epochs=1, angle_obs=[2], actor_fc_layers=[8])
    learner = build(cfg, obs_space, act_space, "cpu", seed=0, num_envs=2)
    _fill(learner, 2, 4, rng)
    learner.update()
    # 4 entries in, 3 kept + sin + cos out; the normaliser covers the expanded features.
    assert learner.obs_norm.mean.shape == (5,)
    east = np.array([[0.5, -0.2, np.pi, 1.0], [0.5, -0.2, -np.pi, 1.0]], np.float32)
    actions = learner.act(east, explore=False).action
    np.testing.assert_allclose(actions[0], actions[1], atol=1e-5)
    with torch.no_grad():
        exported = learner.policy()(torch.from_numpy(east)).numpy()
    np.testing.assert_allclose(exported, actions, atol=1e-6)


@pytest.mark.parametrize("angles", [[4], [-1], [1, 1]])
def test_angle_features_refuse_bad_indices(angles):
    obs_space, act_space = _spaces("box")
    with pytest.raises(ConfigError, match="angle_obs"):
        build(Config(angle_obs=angles), obs_space, act_space, "cpu", seed=0, num_envs=1)
