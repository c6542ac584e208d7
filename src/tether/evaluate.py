"""Deterministic evaluation of a learner and policy animations."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tether.algos import Learner
from tether.config import JobConfig
from tether.envs import evaluation_environment, make_single_env, make_vector_env


@dataclass
class EvalResult:
    episodes: int
    mean_return: float
    std_return: float
    success_rate: float | None
    mean_length: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    learner: Learner, config: JobConfig, episodes: int = 100, seed: int = 10_000, max_parallel: int = 128
) -> EvalResult:
    """Run exactly `episodes` episodes with the deterministic policy: each env copy plays one
    episode per round, so short episodes are not over-counted."""
    returns: list[float] = []
    lengths: list[int] = []
    successes: list[float] = []
    while len(returns) < episodes:
        n = min(max_parallel, episodes - len(returns))
        env_cfg = evaluation_environment(config.environment, num_envs=n)
        env = make_vector_env(env_cfg, config.rewards)
        try:
            obs, _ = env.reset(seed=seed + len(returns))
            ret, length = np.zeros(n), np.zeros(n, dtype=np.int64)
            finished = np.zeros(n, dtype=bool)
            while not finished.all():
                action = learner.act(obs, explore=False).action
                obs, reward, terminated, truncated, info = env.step(action)
                active = ~finished
                ret[active] += reward[active]
                length[active] += 1
                done = np.logical_or(terminated, truncated) & active
                for i in np.flatnonzero(done):
                    returns.append(float(ret[i]))
                    lengths.append(int(length[i]))
                    if "success" in info:
                        successes.append(float(bool(info["success"][i])))
                finished |= done
        finally:
            env.close()
    return EvalResult(
        episodes=len(returns),
        mean_return=float(np.mean(returns)),
        std_return=float(np.std(returns)),
        success_rate=float(np.mean(successes)) if successes else None,
        mean_length=float(np.mean(lengths)),
    )


def record_gif(
    learner: Learner, config: JobConfig, path: Path, seed: int = 0, max_frames: int = 600, fps: int = 15
) -> int:
    """Play one episode with the deterministic policy and save it as an animated GIF."""
    from PIL import Image

    env = make_single_env(evaluation_environment(config.environment), config.rewards, render_mode="rgb_array")
    frames = []
    try:
        obs, _ = env.reset(seed=seed)
        frames.append(env.render())
        for _ in range(max_frames):
            action = learner.act(np.asarray(obs)[None], explore=False).action[0]
            obs, _, terminated, truncated, _ = env.step(action)
            frames.append(env.render())
            if terminated or truncated:
                break
    finally:
        env.close()
    images = [Image.fromarray(np.asarray(f)) for f in frames if f is not None]
    if not images:
        raise ValueError("the environment rendered no frames")
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return len(images)
