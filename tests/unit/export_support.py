"""Learners for the export tests: real algorithms on real Gymnasium spaces, trained for a few
updates on real environment steps so normalisers and weights are far from their initial values."""

from __future__ import annotations

import importlib
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from tether.algos.base import Transitions
from tether.config import EnvironmentConfig
from tether.envs import final_observations, make_vector_env

LEARNERS = ("ppo_box", "ppo_discrete", "dqn", "dqn_discrete_obs", "sac", "rgbd")


def _train_on_env(learner: Any, env_id: str, num_envs: int, steps: int, seed: int = 0) -> np.ndarray:
    """Step `env_id` with the exploring policy, feed every batch, update whenever ready; return
    the observations met (the "recorded" set)."""
    env = make_vector_env(EnvironmentConfig(id=env_id, num_envs=num_envs))
    seen = []
    try:
        obs, _ = env.reset(seed=seed)
        for _ in range(steps):
            out = learner.act(obs, explore=True)
            nxt, reward, term, trunc, info = env.step(out.action)
            learner.observe(
                Transitions(obs, out.action, reward, final_observations(nxt, info), term, trunc, out.extras)
            )
            seen.append(np.asarray(obs))
            if learner.ready():
                learner.update()
            obs = nxt
    finally:
        env.close()
    return np.concatenate(seen)


def _spaces(env_id: str) -> tuple[gym.Space[Any], gym.Space[Any]]:
    env = make_vector_env(EnvironmentConfig(id=env_id, num_envs=1))
    try:
        return env.single_observation_space, env.single_action_space
    finally:
        env.close()


def make_learner(kind: str) -> tuple[Any, gym.Space[Any], gym.Space[Any], Any]:
    """(learner, observation space, action space, recorded observations) for one learner kind."""
    torch.manual_seed(0)
    if kind in ("ppo_box", "ppo_discrete"):
        from tether.algos import ppo

        env_id = "tether/Lunabotics-v0" if kind == "ppo_box" else "CartPole-v1"
        obs_space, act_space = _spaces(env_id)
        # The Lunabotics preset's heading feature (sin/cos of obs[4]) goes through export too.
        angles = [4] if kind == "ppo_box" else []
        cfg = ppo.Config(rollout_steps=16, num_epochs=2, batch_size=32, angle_obs=angles)
        learner = ppo.build(cfg, obs_space, act_space, "cpu", 0, num_envs=4)
        recorded = _train_on_env(learner, env_id, 4, 48)
        assert learner.updates >= 2 and learner.obs_norm is not None
        return learner, obs_space, act_space, recorded
    if kind in ("dqn", "dqn_discrete_obs"):
        dqn = pytest.importorskip("tether.algos.dqn")
        env_id = "CartPole-v1" if kind == "dqn" else "FrozenLake-v1"
        obs_space, act_space = _spaces(env_id)
        cfg = dqn.Config(learning_starts=16, batch_size=16, net_arch=[64, 64], dueling=kind == "dqn")
        learner = dqn.build(cfg, obs_space, act_space, "cpu", 0)
        recorded = _train_on_env(learner, env_id, 4, 40)
        return learner, obs_space, act_space, recorded
    if kind == "sac":
        sac = pytest.importorskip("tether.algos.sac")
        obs_space, act_space = _spaces("Pendulum-v1")
        cfg = sac.Config(
            batch_size=32,
            learning_starts=32,
            actor_fc_layers=[64, 64],
            critic_fc_layers=[64, 64],
            normalize_obs=True,
        )
        learner = sac.build(cfg, obs_space, act_space, "cpu", 0)
        recorded = _train_on_env(learner, "Pendulum-v1", 4, 24)
        return learner, obs_space, act_space, recorded
    if kind == "rgbd":
        rgbd = pytest.importorskip("tether.nets_rgbd")
        from tether.algos import ppo

        obs_space = rgbd.rgbd_observation_space((32, 24))
        act_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        cfg = ppo.Config(rollout_steps=4, num_epochs=1, batch_size=8)
        learner = ppo.PPO(
            cfg, obs_space, act_space, "cpu", 0, actor_critic=rgbd.RgbdActorCritic(), num_envs=2
        )
        recorded = _random_dict_rollout(learner, obs_space, steps=8)
        return learner, obs_space, act_space, recorded
    raise ValueError(kind)


def _random_dict_rollout(learner: Any, space: gym.spaces.Dict, steps: int) -> dict[str, np.ndarray]:
    """Camera-like frames (a bright blob that moves) for the RGB-D policy; two updates."""
    rng = np.random.default_rng(0)
    rows: list[dict[str, np.ndarray]] = []

    def frame() -> dict[str, np.ndarray]:
        obs = {k: np.stack([s.sample() for _ in range(2)]) for k, s in space.spaces.items()}
        obs["proprio"] = rng.normal(0, 0.3, obs["proprio"].shape).astype(np.float32)
        return obs

    obs = frame()
    for _ in range(steps):
        out = learner.act(obs, explore=True)
        nxt = frame()
        learner.observe(
            Transitions(
                obs,
                out.action,
                rng.normal(size=2).astype(np.float32),
                nxt,
                np.zeros(2, bool),
                np.zeros(2, bool),
                out.extras,
            )
        )
        rows.append(obs)
        if learner.ready():
            learner.update()
        obs = nxt
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
