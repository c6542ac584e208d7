"""Learning at fixed step budgets (the RL Baselines3 Zoo's, and the `make demo` preset's), plus
SAC against PPO on Lunabotics at equal wall-clock time. Long: run one case at a time.

    python benchmarks/bench_learning.py ppo-lunarlander        # ≥ 200 within 1M steps
    python benchmarks/bench_learning.py lunabotics-seeds --seeds 5   # the demo preset, seeds 0..4
    python benchmarks/bench_learning.py dqn-lunarlander        # ≥ 150 within 100k steps
    python benchmarks/bench_learning.py sac-lunarlander        # ≥ 200 within 500k steps
    python benchmarks/bench_learning.py lunabotics --seconds 1800   # SAC vs PPO, equal wall-clock
    python benchmarks/bench_learning.py lunarlander-dqn-vs-sb3  # same budget, SB3 DQN beside

Each case trains with the real `Trainer` on the preset, then evaluates the deterministic policy
for `--episodes` episodes and prints the mean return next to the target (and the peer's where
one runs in the same invocation).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

import torch

from tether.config import load_config
from tether.evaluate import evaluate
from tether.trainer import Trainer


def train_and_eval(
    preset: str, overrides: list[str], episodes: int, seconds: float | None = None
) -> tuple[float, int, float, float | None]:
    """Returns (mean eval return, env steps trained, wall seconds, eval success rate or None)."""
    config, _ = load_config(preset, ["device=cpu", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, Path(tmp) / "run")
        timer = threading.Timer(seconds, trainer.request_stop) if seconds else None
        if timer:
            timer.start()
        start = time.perf_counter()
        try:
            result = trainer.run()
        finally:
            if timer:
                timer.cancel()
        wall = time.perf_counter() - start
        score = evaluate(trainer.learner, config, episodes=episodes)
    return score.mean_return, result.steps, wall, score.success_rate


def report(
    name: str,
    score: float,
    steps: int,
    wall: float,
    success: float | None = None,
    target: float | None = None,
) -> None:
    verdict = "" if target is None else ("  PASS" if score >= target else "  below target")
    goal = "" if target is None else f" (target ≥ {target:g})"
    rate = "" if success is None else f", success {100 * success:.0f} %"
    print(f"{name:<34} mean return {score:8.1f}{goal}{rate} after {steps:,} steps in {wall:,.0f} s{verdict}")


def sb3_dqn_lunarlander(steps: int, episodes: int) -> float:
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import DQN

    c = load_config("lunarlander-dqn")[0].training
    model = DQN(
        "MlpPolicy",
        "LunarLander-v3",
        learning_rate=c.learning_rate,
        buffer_size=c.buffer_size,
        learning_starts=c.learning_starts,
        batch_size=c.batch_size,
        gamma=c.discount_factor,
        train_freq=c.train_freq,
        gradient_steps=c.gradient_steps,
        target_update_interval=c.target_update_interval * c.train_freq // c.gradient_steps,
        exploration_fraction=c.epsilon_decay_steps / steps,
        exploration_final_eps=c.epsilon_end,
        policy_kwargs={"net_arch": list(c.net_arch)},
        device="cpu",
        seed=0,
    )
    model.learn(total_timesteps=steps)
    env = gym.make("LunarLander-v3")
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=10_000 + ep)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, r, term, trunc, _ = env.step(int(action))
            total += float(r)
            done = term or trunc
        returns.append(total)
    return float(np.mean(returns))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "case",
        choices=[
            "ppo-lunarlander",
            "lunabotics-seeds",
            "dqn-lunarlander",
            "sac-lunarlander",
            "lunabotics",
            "lunarlander-dqn-vs-sb3",
        ],
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (lunabotics-seeds)")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument(
        "--seconds", type=float, default=1800.0, help="wall-clock budget per learner (lunabotics)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    threads = f"torch_threads={args.threads}"
    if args.case == "ppo-lunarlander":
        report(
            "PPO LunarLander-v3 (1M)", *train_and_eval("lunarlander", [threads], args.episodes), target=200
        )
    elif args.case == "lunabotics-seeds":
        # The `make demo` job as it ships: success of the deterministic policy after its budget.
        for seed in range(args.seeds):
            report(
                f"PPO Lunabotics seed {seed}",
                *train_and_eval("lunabotics", [threads, f"seed={seed}"], args.episodes),
            )
    elif args.case == "dqn-lunarlander":
        report(
            "DQN LunarLander-v3 (100k)",
            *train_and_eval("lunarlander-dqn", [threads], args.episodes),
            target=150,
        )
    elif args.case == "sac-lunarlander":
        report(
            "SAC LunarLanderContinuous-v3 (500k)",
            *train_and_eval("lunarlandercontinuous-sac", [threads], args.episodes),
            target=200,
        )
    elif args.case == "lunarlander-dqn-vs-sb3":
        # The zoo's values on both sides: SB3's DQN has neither Double DQN nor (here) n-step returns.
        zoo = ["training.double_q=false", "training.n_step=1"]
        ours = train_and_eval("lunarlander-dqn", [threads, *zoo], args.episodes)
        report("Tether DQN LunarLander-v3 (100k)", *ours, target=150)
        peer = sb3_dqn_lunarlander(100_000, args.episodes)
        print(f"{'SB3 DQN LunarLander-v3 (100k)':<34} mean return {peer:8.1f}")
    else:
        big = "schedule.total_steps=1000000000"
        sac = train_and_eval("lunabotics-sac", [threads, big], args.episodes, seconds=args.seconds)
        ppo = train_and_eval("lunabotics", [threads, big], args.episodes, seconds=args.seconds)
        report(f"SAC Lunabotics ({args.seconds:.0f} s)", *sac)
        report(f"PPO Lunabotics ({args.seconds:.0f} s)", *ppo)


if __name__ == "__main__":
    main()
