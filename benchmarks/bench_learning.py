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
one runs in the same invocation). With `--eval-every N` the run also evaluates every N env steps
during training (`schedule.eval_every`, over `--eval-episodes` episodes) and prints the first step
whose evaluation reached the target, and the best one:

    python benchmarks/bench_learning.py dqn-lunarlander --eval-every 10000
"""

from __future__ import annotations

import argparse
import functools
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.config import load_config
from tether.evaluate import evaluate
from tether.metrics import METRICS_UPDATE, read_jsonl
from tether.trainer import Trainer


@dataclass
class Outcome:
    """One trained-and-evaluated run."""

    score: float  # mean return of the final deterministic evaluation
    steps: int  # env steps trained
    wall: float  # seconds of training
    success: float | None  # the final evaluation's success rate, where the env reports one
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, mean return) during training


def train_and_eval(
    preset: str,
    overrides: list[str],
    episodes: int,
    seconds: float | None = None,
    eval_every: int = 0,
    eval_episodes: int = 20,
) -> Outcome:
    """Train `preset` (for at most `seconds` when given), then evaluate it over `episodes`;
    `eval_every` > 0 also evaluates during training."""
    during = (
        [f"schedule.eval_every={eval_every}", f"schedule.eval_every_episodes={eval_episodes}"]
        if eval_every
        else []
    )
    config, _ = load_config(preset, ["device=cpu", *overrides, *during])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        trainer = Trainer(config, run_dir)
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
        assert trainer.learner is not None  # built by run()
        score = evaluate(trainer.learner, config, episodes=episodes)
        evals = [
            (int(e["data"]["step"]), float(e["data"]["eval/mean_return"]))
            for e in read_jsonl(run_dir / "metrics.jsonl")
            if e["type"] == METRICS_UPDATE and "eval/mean_return" in e["data"]
        ]
    return Outcome(score.mean_return, result.steps, wall, score.success_rate, evals)


def report(name: str, outcome: Outcome, target: float | None = None) -> None:
    verdict = "" if target is None else ("  PASS" if outcome.score >= target else "  below target")
    goal = "" if target is None else f" (target ≥ {target:g})"
    rate = "" if outcome.success is None else f", success {100 * outcome.success:.0f} %"
    print(
        f"{name:<34} mean return {outcome.score:8.1f}{goal}{rate} after {outcome.steps:,} steps "
        f"in {outcome.wall:,.0f} s{verdict}"
    )
    if outcome.evals:
        best_step, best = max(outcome.evals, key=lambda e: e[1])
        reached = ""
        if target is not None:
            first = next((e for e in outcome.evals if e[1] >= target), None)
            reached = (
                "; never reached the target"
                if first is None
                else f"; first at or above the target at step {first[0]:,} ({first[1]:.1f})"
            )
        print(
            f"{'':<34} {len(outcome.evals)} evaluations during training: "
            f"best {best:.1f} at step {best_step:,}{reached}"
        )


def sb3_dqn_lunarlander(steps: int, episodes: int) -> float:
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import DQN

    c: Any = load_config("lunarlander-dqn")[0].training  # the DQN section (typed as its base)
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
    parser.add_argument(
        "--seed", type=int, default=None, help="seed for the other cases (default: the preset's)"
    )
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument(
        "--seconds", type=float, default=1800.0, help="wall-clock budget per learner (lunabotics)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run of the case, as `tether train --set` (repeatable)",
    )
    parser.add_argument(
        "--eval-every", type=int, default=0, help="also evaluate every N env steps during training (0: off)"
    )
    parser.add_argument(
        "--eval-episodes", type=int, default=20, help="episodes per evaluation during training"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    common = [
        f"torch_threads={args.threads}",
        *([f"seed={args.seed}"] if args.seed is not None else []),
        *args.set,
    ]
    run = functools.partial(train_and_eval, eval_every=args.eval_every, eval_episodes=args.eval_episodes)

    if args.case == "ppo-lunarlander":
        report("PPO LunarLander-v3 (1M)", run("lunarlander", common, args.episodes), target=200)
    elif args.case == "lunabotics-seeds":
        # The `make demo` job as it ships: success of the deterministic policy after its budget.
        for seed in range(args.seeds):
            report(
                f"PPO Lunabotics seed {seed}",
                run("lunabotics", [*common, f"seed={seed}"], args.episodes),
            )
    elif args.case == "dqn-lunarlander":
        report(
            "DQN LunarLander-v3 (100k)",
            run("lunarlander-dqn", common, args.episodes),
            target=150,
        )
    elif args.case == "sac-lunarlander":
        report(
            "SAC LunarLanderContinuous-v3 (500k)",
            run("lunarlandercontinuous-sac", common, args.episodes),
            target=200,
        )
    elif args.case == "lunarlander-dqn-vs-sb3":
        # The zoo's values on both sides: SB3's DQN has neither Double DQN nor (here) n-step returns.
        zoo = ["training.double_q=false", "training.n_step=1"]
        ours = run("lunarlander-dqn", [*common, *zoo], args.episodes)
        report("Tether DQN LunarLander-v3 (100k)", ours, target=150)
        peer = sb3_dqn_lunarlander(100_000, args.episodes)
        print(f"{'SB3 DQN LunarLander-v3 (100k)':<34} mean return {peer:8.1f}")
    else:
        big = "schedule.total_steps=1000000000"
        sac = run("lunabotics-sac", [*common, big], args.episodes, seconds=args.seconds)
        ppo = run("lunabotics", [*common, big], args.episodes, seconds=args.seconds)
        report(f"SAC Lunabotics ({args.seconds:.0f} s)", sac)
        report(f"PPO Lunabotics ({args.seconds:.0f} s)", ppo)


if __name__ == "__main__":
    main()
