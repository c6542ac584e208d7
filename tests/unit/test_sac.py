"""SAC: the squashed-Gaussian log-probability, action scaling, entropy tuning, save/load."""

from __future__ import annotations

import copy
import io
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from tether.algos.base import Transitions
from tether.algos.sac import Config, build, squashed_sample
from tether.config import ConfigError

OBS = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
ACT = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 10.0], np.float32))


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_log_prob_correction_matches_numeric_density() -> None:
    """log π(ã) from squashed_sample equals the log of the numerically differentiated CDF of
    ã = tanh(u), u ~ N(μ, σ): P(ã ≤ a) = Φ((atanh a − μ)/σ), summed over independent dims."""
    torch.manual_seed(0)
    mean = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.5, -0.7]], dtype=torch.float64)
    log_std = torch.tensor([[-0.5, 0.2, -1.0], [0.0, -2.0, 0.4]], dtype=torch.float64)
    action, logp = squashed_sample(mean, log_std)
    assert action.abs().max() < 1.0
    h = 1e-6
    for row in range(2):
        ref = 0.0
        for d in range(3):
            mu, sigma, a = float(mean[row, d]), math.exp(float(log_std[row, d])), float(action[row, d])
            cdf = lambda x, mu=mu, sigma=sigma: _normal_cdf((math.atanh(x) - mu) / sigma)  # noqa: E731
            ref += math.log((cdf(a + h) - cdf(a - h)) / (2 * h))
        assert float(logp[row]) == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_log_prob_stays_finite_when_tanh_saturates() -> None:
    mean = torch.tensor([[30.0, -30.0]])
    _, logp = squashed_sample(mean, torch.full((1, 2), -5.0))
    assert torch.isfinite(logp).all()


def _learner(**overrides) -> object:
    cfg = Config(batch_size=32, learning_starts=0, actor_fc_layers=[32], critic_fc_layers=[32], **overrides)
    return build(cfg, OBS, ACT, "cpu", seed=3)


def _random_batch(rng: np.random.Generator, n: int) -> Transitions:
    action = rng.uniform(ACT.low, ACT.high, (n, 2)).astype(np.float32)
    return Transitions(
        rng.normal(size=(n, 3)).astype(np.float32),
        action,
        rng.normal(size=n).astype(np.float32),
        rng.normal(size=(n, 3)).astype(np.float32),
        rng.random(n) < 0.1,
        np.zeros(n, bool),
    )


def test_actions_are_scaled_to_bounds_and_policy_matches_act() -> None:
    sac = _learner()
    obs = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32) * 5
    for explore in (True, False):
        a = sac.act(obs, explore=explore).action
        assert a.shape == (64, 2)
        assert (a >= ACT.low).all() and (a <= ACT.high).all()
    det = sac.act(obs, explore=False).action
    np.testing.assert_allclose(sac.policy()(torch.as_tensor(obs)).numpy(), det, rtol=1e-6, atol=1e-6)
    # Before learning_starts the actions are uniform over the whole box.
    warm = (
        build(Config(learning_starts=10_000), OBS, ACT, "cpu", 0)
        .act(np.zeros((2000, 3)), explore=True)
        .action
    )
    assert warm[:, 1].min() < 0.5 and warm[:, 1].max() > 9.5 and abs(warm[:, 1].mean() - 5.0) < 0.5


def test_numpy_acting_matches_the_torch_path_draw_for_draw() -> None:
    fast, reference = _learner(), _learner()
    reference._numpy_acting = None  # acting through torch, as with normalisation or a GPU
    assert fast._numpy_acting is not None
    obs = np.random.default_rng(5).normal(size=(16, 3)).astype(np.float32) * 5
    for explore in (False, True, True):
        ours, theirs = fast.act(obs, explore=explore).action, reference.act(obs, explore=explore).action
        assert ours.dtype == theirs.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert _learner(normalize_obs=True)._numpy_acting is None


def test_update_trains_every_part_and_tunes_entropy() -> None:
    sac = _learner(train_freq=4, gradient_steps=2)
    rng = np.random.default_rng(1)
    actor0 = [p.detach().clone() for p in sac.actor.parameters()]
    critic0 = [p.detach().clone() for p in sac.critic.parameters()]
    target0 = [p.detach().clone() for p in sac.critic_target.parameters()]
    sac.observe(_random_batch(rng, 40))
    assert sac.ready()
    metrics = sac.update()
    assert sac.grad_steps == 20  # 40 transitions / train_freq 4 × 2 gradient steps
    assert not sac.ready()
    assert set(metrics) >= {"critic_loss", "actor_loss", "ent_coef", "q_mean", "entropy"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(actor0, sac.actor.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(critic0, sac.critic.parameters(), strict=True))
    # Polyak targets move towards the critics but only by τ per step.
    for t0, t1, c1 in zip(target0, sac.critic_target.parameters(), sac.critic.parameters(), strict=True):
        assert (t1 - t0).abs().max() <= (c1 - t0).abs().max() + 1e-6
    # The policy's entropy (≈ 1.4 nats for 2 dims at init) exceeds the target −2, so α must fall.
    assert metrics["ent_coef"] < 1.0


def test_fixed_entropy_coefficient_is_used_as_is() -> None:
    sac = _learner(ent_coef=0.05)
    sac.observe(_random_batch(np.random.default_rng(2), 64))
    metrics = sac.update()
    assert metrics["ent_coef"] == pytest.approx(0.05)


def test_save_load_gives_identical_actions_and_updates() -> None:
    rng = np.random.default_rng(4)
    sac = _learner(n_step=2)
    sac.observe(_random_batch(rng, 64))
    sac.update()
    raw = io.BytesIO()
    torch.save(sac.state_dict(), raw)
    raw.seek(0)
    other = _learner(n_step=2)
    other.load_state_dict(torch.load(raw, weights_only=True))
    obs = rng.normal(size=(8, 3)).astype(np.float32)
    np.testing.assert_array_equal(sac.act(obs, explore=False).action, other.act(obs, explore=False).action)
    np.testing.assert_array_equal(sac.act(obs, explore=True).action, other.act(obs, explore=True).action)
    # The same batch and RNG state gives the same next update.
    batch = _random_batch(rng, 16)
    sac.observe(batch)
    other.observe(batch)
    torch.manual_seed(9)
    m1 = sac.update()
    torch.manual_seed(9)
    m2 = other.update()
    assert m1 == m2
    for a, b in zip(sac.actor.parameters(), other.actor.parameters(), strict=True):
        assert torch.equal(a, b)


def test_observation_normalisation_is_baked_into_the_policy() -> None:
    sac = _learner(normalize_obs=True)
    rng = np.random.default_rng(5)
    batch = _random_batch(rng, 256)
    batch.obs = batch.obs * 100 + 50
    sac.observe(batch)
    assert np.allclose(sac.norm.mean.numpy(), batch.obs.mean(0), atol=1e-3)
    obs = batch.obs[:4]
    np.testing.assert_allclose(
        sac.policy()(torch.as_tensor(obs)).numpy(), sac.act(obs, explore=False).action, rtol=1e-6, atol=1e-6
    )


def test_angle_observations_reach_the_networks_as_sine_and_cosine() -> None:
    sac = _learner(normalize_obs=True, angle_obs=[2])
    assert sac.net_obs_dim == 4 and sac._numpy_acting is None
    rng = np.random.default_rng(6)
    batch = _random_batch(rng, 256)
    sac.observe(batch)
    sac.update()
    # The normaliser saw (x0, x1, sin x2, cos x2), never the raw angle.
    x = batch.obs
    feats = np.stack([x[:, 0], x[:, 1], np.sin(x[:, 2]), np.cos(x[:, 2])], axis=1)
    np.testing.assert_allclose(sac.norm.mean.numpy(), feats.mean(0), atol=1e-4)
    # Headings a full turn apart are one heading, to the learner and to the exported policy.
    obs = x[:8].copy()
    turned = obs.copy()
    turned[:, 2] += 2 * np.pi
    det = sac.act(obs, explore=False).action
    np.testing.assert_allclose(sac.act(turned, explore=False).action, det, rtol=1e-5, atol=1e-5)
    policy = sac.policy()
    np.testing.assert_allclose(policy(torch.as_tensor(obs)).numpy(), det, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(policy(torch.as_tensor(turned)).numpy(), det, rtol=1e-5, atol=1e-5)
    for bad in ([3], [2, 2]):
        with pytest.raises(ConfigError, match="angle_obs"):
            _learner(angle_obs=bad)


def test_build_refuses_unsuitable_spaces() -> None:
    with pytest.raises(ConfigError):
        build(Config(), OBS, gym.spaces.Discrete(3), "cpu", 0)
    with pytest.raises(ConfigError):
        build(Config(), OBS, gym.spaces.Box(-np.inf, np.inf, (2,)), "cpu", 0)


def _reference_step(sac, b) -> None:
    """One SAC gradient step as first written: α, critics, then the actor with frozen critics."""
    obs, next_obs = b.obs, b.next_obs
    action = (b.action.reshape(-1, sac.act_dim) - sac.center) / sac.half
    pi_action, logp = sac.actor.sample(obs)
    alpha = sac.log_alpha.detach().exp()
    alpha_loss = -(sac.log_alpha * (logp.detach() + sac.target_entropy)).mean()
    sac.alpha_opt.zero_grad(set_to_none=True)
    alpha_loss.backward()
    sac.alpha_opt.step()
    with torch.no_grad():
        next_action, next_logp = sac.actor.sample(next_obs)
        next_q = sac.critic_target(next_obs, next_action).min(0).values - alpha * next_logp
        target = b.reward + b.discount * b.not_done * next_q
    critic_loss = 0.5 * (sac.critic(obs, action) - target).pow(2).mean(1).sum()
    sac.critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward()
    sac.critic_opt.step()
    sac.critic.requires_grad_(False)
    actor_loss = (alpha * logp - sac.critic(obs, pi_action).min(0).values).mean()
    sac.actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    sac.actor_opt.step()
    sac.critic.requires_grad_(True)
    with torch.no_grad():
        torch._foreach_lerp_(
            list(sac.critic_target.parameters()), list(sac.critic.parameters()), sac.config.tau
        )


def test_update_matches_the_step_by_step_reference() -> None:
    # α's gradient now comes from the actor's backward pass and the critics are kept out of it by
    # `inputs`: the parameters must come out as with separate passes and frozen critics.
    sac = _learner(train_freq=64, gradient_steps=3)
    sac.observe(_random_batch(np.random.default_rng(5), 64))
    reference = copy.deepcopy(sac)
    torch.manual_seed(11)
    sac.update()
    torch.manual_seed(11)
    for b in reference.buffer.sample_tensors(sac.config.batch_size, 3, reference.device):
        _reference_step(reference, b)
    for name in ("actor", "critic", "critic_target"):
        ours, theirs = getattr(sac, name).state_dict(), getattr(reference, name).state_dict()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key])
    torch.testing.assert_close(sac.log_alpha, reference.log_alpha)
