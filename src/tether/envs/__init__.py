"""Environments: our own batched envs and any Gymnasium id, behind one vector-env factory.

Every vector env Tether drives uses same-step autoreset: when a copy's episode ends, `step()`
returns the first observation of its next episode and puts the final observation in
`info["final_obs"]` (mask `info["_final_obs"]`), so `Transitions.next_obs` can be exact.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from pydantic import ValidationError

from tether.config import ConfigError, EnvironmentConfig

LUNABOTICS_ID = "tether/Lunabotics-v0"

gym.register(
    id=LUNABOTICS_ID,
    entry_point="tether.envs.lunabotics:LunaboticsEnv",
    # The env truncates itself after `max_steps_per_episode` (its own config), so no TimeLimit wrapper.
    disable_env_checker=True,
)


def _is_lunabotics(env_id: str) -> bool:
    return env_id in (LUNABOTICS_ID, "Lunabotics-v0", "lunabotics")


def _lunabotics_configs(env_cfg: EnvironmentConfig, rewards: dict[str, float]) -> tuple[Any, Any]:
    from tether.envs.lunabotics import LunaboticsConfig, LunaboticsRewards

    options = env_cfg.options
    if env_cfg.max_steps_per_episode is not None:
        options["max_steps_per_episode"] = env_cfg.max_steps_per_episode
    try:
        physics = LunaboticsConfig.model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(
                f"unknown config key 'environment.{key}' for {LUNABOTICS_ID}; check its spelling."
            ) from None
        raise ConfigError(
            f"config key 'environment.{key}': {err['msg']} (got {err.get('input')!r})."
        ) from None
    try:
        reward_terms = LunaboticsRewards.model_validate(rewards)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            names = ", ".join(LunaboticsRewards.model_fields)
            raise ConfigError(f"unknown reward term 'rewards.{key}'; the terms are: {names}.") from None
        raise ConfigError(f"reward term 'rewards.{key}': {err['msg']} (got {err.get('input')!r}).") from None
    return physics, reward_terms


def validate_environment(env_cfg: EnvironmentConfig, rewards: dict[str, float]) -> None:
    """Raise `ConfigError` for an unknown env id, unknown env options or reward terms."""
    if _is_lunabotics(env_cfg.id):
        _lunabotics_configs(env_cfg, rewards)
        return
    try:
        gym.spec(env_cfg.id)
    except gym.error.Error:
        raise ConfigError(
            f"unknown environment id '{env_cfg.id}'; use {LUNABOTICS_ID} or a registered Gymnasium id "
            "such as CartPole-v1."
        ) from None
    if rewards:
        raise ConfigError(
            f"the 'rewards' section only applies to {LUNABOTICS_ID}; remove it for {env_cfg.id}."
        )


def evaluation_environment(env_cfg: EnvironmentConfig, **update: Any) -> EnvironmentConfig:
    """`env_cfg` without the env's training-only options (curricula: evaluation and recordings
    always play the task itself), with `update` applied."""
    training_only: frozenset[str] = frozenset()
    if _is_lunabotics(env_cfg.id):
        from tether.envs.lunabotics import TRAINING_ONLY_OPTIONS as training_only
    fields = {k: v for k, v in env_cfg.model_dump().items() if k not in training_only}
    return EnvironmentConfig.model_validate({**fields, **update})


def make_vector_env(
    env_cfg: EnvironmentConfig, rewards: dict[str, float] | None = None, render_mode: str | None = None
) -> gym.vector.VectorEnv:
    """Build the vector env a job trains on (same-step autoreset, see the module docstring)."""
    rewards = rewards or {}
    if _is_lunabotics(env_cfg.id):
        from tether.envs.lunabotics import LunaboticsVectorEnv

        physics, reward_terms = _lunabotics_configs(env_cfg, rewards)
        return LunaboticsVectorEnv(env_cfg.num_envs, physics, reward_terms, render_mode=render_mode)
    kwargs: dict[str, Any] = dict(env_cfg.options)
    if env_cfg.max_steps_per_episode is not None:
        kwargs["max_episode_steps"] = env_cfg.max_steps_per_episode
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        return gym.make_vec(
            env_cfg.id,
            num_envs=env_cfg.num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
            **kwargs,
        )
    except gym.error.DependencyNotInstalled as exc:
        raise ConfigError(
            f"{env_cfg.id} needs an optional package: {exc}; try `pip install 'tether[classic]'`."
        ) from None
    except TypeError as exc:
        raise ConfigError(f"environment options for {env_cfg.id} were refused: {exc}.") from None


def make_single_env(
    env_cfg: EnvironmentConfig, rewards: dict[str, float] | None = None, render_mode: str | None = None
) -> gym.Env:
    """One (non-vector) copy of a job's environment, for evaluation and rendering."""
    rewards = rewards or {}
    if _is_lunabotics(env_cfg.id):
        from tether.envs.lunabotics import LunaboticsEnv

        physics, reward_terms = _lunabotics_configs(env_cfg, rewards)
        return LunaboticsEnv(config=physics, rewards=reward_terms, render_mode=render_mode)
    kwargs: dict[str, Any] = dict(env_cfg.options)
    if env_cfg.max_steps_per_episode is not None:
        kwargs["max_episode_steps"] = env_cfg.max_steps_per_episode
    return gym.make(env_cfg.id, render_mode=render_mode, **kwargs)


def final_observations(next_obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """The true successor observations: `next_obs` with final observations swapped in where an
    episode ended this step (same-step autoreset)."""
    mask = info.get("_final_obs")
    if mask is None or not np.any(mask):
        return next_obs
    out = np.array(next_obs, copy=True)
    finals = info["final_obs"]
    for i in np.flatnonzero(mask):
        out[i] = finals[i]
    return out
