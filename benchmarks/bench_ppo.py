"""Tether PPO vs Stable-Baselines3 PPO: end-to-end training steps/s, same machine, same run.

Same hyperparameters on both sides (learning rate, epochs, minibatch, γ, λ, clip, network sizes,
activation, observation normalisation, samples per update); SB3 drives the single-env view of
Lunabotics (`tether/Lunabotics-v0`) as its users would, Tether drives the batched env. Each side
first trains one warm-up update, then is timed over the same number of steps.

    python benchmarks/bench_ppo.py [--updates 3] [--only lunabotics|cartpole]
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch

from tether.config import load_config
from tether.trainer import Trainer


def tether_sps(preset: str, overrides: list[str], steps: int, warmup: int) -> float:
    import tempfile
    from pathlib import Path

    marks: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config, _ = load_config(
            preset, [*overrides, f"schedule.total_steps={warmup + steps}", "schedule.checkpoint_every=100000"]
        )
        trainer = Trainer(config, Path(tmp) / "run")
        trainer.bus.add_sink(
            lambda e: (
                marks.append((e["data"]["step"], time.perf_counter()))
                if e["type"] == "metrics_update"
                else None
            )
        )
        trainer.run()
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return (s1 - s0) / (t1 - t0)


def sb3_sps(env_fn, n_steps: int, cfg: dict, steps: int, normalize: bool) -> float:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize

    venv: VecEnv = DummyVecEnv([env_fn])
    if normalize:
        venv = VecNormalize(venv, norm_obs=True, norm_reward=False)
    model = PPO(
        "MlpPolicy",
        venv,
        n_steps=n_steps,
        batch_size=cfg["batch_size"],
        n_epochs=cfg["num_epochs"],
        learning_rate=cfg["learning_rate"],
        gamma=cfg["discount_factor"],
        gae_lambda=cfg["lambda_gae"],
        clip_range=cfg["clip_range"],
        ent_coef=cfg["ent_coef"],
        vf_coef=cfg["vf_coef"],
        max_grad_norm=cfg["max_grad_norm"],
        device="cpu",
        verbose=0,
        policy_kwargs={
            "net_arch": {"pi": cfg["actor_fc_layers"], "vf": cfg["value_fc_layers"]},
            "activation_fn": torch.nn.Tanh,
        },
    )
    model.learn(n_steps)  # warm-up update
    t0 = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    return steps / (time.perf_counter() - t0)


def compare(name: str, preset: str, env_fn, updates: int, normalize: bool) -> tuple[float, float]:
    config, _ = load_config(preset)
    cfg = config.training.model_dump()
    per_update = config.environment.num_envs * cfg["rollout_steps"]
    steps = updates * per_update
    torch.set_num_threads(2)
    ours = tether_sps(preset, ["torch_threads=2"], steps, per_update)
    theirs = sb3_sps(env_fn, per_update, cfg, steps, normalize)
    print(
        f"{name:<12} samples/update {per_update:>6}  tether {ours:>9,.0f} steps/s "
        f"({config.environment.num_envs} envs)  sb3 {theirs:>8,.0f} steps/s (1 env)  "
        f"ratio {ours / theirs:5.1f}x"
    )
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--only", choices=["lunabotics", "cartpole"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads 2, numpy {np.__version__}")
    if args.only in (None, "lunabotics"):
        from tether.envs.lunabotics import LunaboticsEnv

        compare("Lunabotics", "lunabotics", LunaboticsEnv, args.updates, normalize=True)
    if args.only in (None, "cartpole"):
        compare(
            "CartPole-v1", "cartpole", lambda: gym.make("CartPole-v1"), args.updates * 10, normalize=False
        )


if __name__ == "__main__":
    main()
