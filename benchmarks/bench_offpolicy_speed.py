"""Training speed of Tether's off-policy learners against Stable-Baselines3, same run, same machine.

Each case trains from scratch for the same number of env steps with the same hyperparameters
(taken from the Tether preset and mapped onto SB3's arguments), the same torch thread count and
one env, and reports env steps per second of the whole training loop (acting, env, replay,
gradient steps) for each, and the ratio — per wall-clock second and per CPU second of the
process (the steadier figure on a shared machine).

    python benchmarks/bench_offpolicy_speed.py                 # DQN CartPole-v1 + SAC Pendulum-v1
    python benchmarks/bench_offpolicy_speed.py --only sac --sac-steps 5000 --repeats 3

Tether runs twice per case: with `training.precision=float32` (the default: the same arithmetic
as SB3) and with `training.precision=auto` (bfloat16 hidden-to-hidden products on a CPU with AMX
or AVX-512 BF16, float32 elsewhere; see docs/offpolicy.md). Both ratios are printed; on a CPU
where `auto` is float32 the second run would repeat the first, so only the float32 one runs.

After each case it prints the ceiling the arithmetic sets: the time of the step's 256-wide
hidden-layer products alone (float32, and bfloat16 where the CPU has it natively; timed on their
own, so a generous figure), per env step, against SB3's whole time per env step. No learner that
does those products can beat SB3 by more than that ratio at that precision.

Notes on "same hyperparameters": SB3's DQN has no Double-DQN, so the Tether side runs with
`double_q=false` here; SB3 counts `target_update_interval` in env steps, Tether in gradient steps,
and the mapping keeps the target-sync period in env steps equal.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch

from tether.algos import dqn, sac
from tether.algos.passes import has_native_bf16, onednn_float32_products, onednn_products
from tether.config import load_config
from tether.trainer import Trainer

Speed = tuple[float, float]  # (env steps per wall second, env steps per CPU second of this process)


def _timed(run: Any, steps: int) -> Speed:
    wall, cpu = time.perf_counter(), time.process_time()
    done = run() or steps
    return done / (time.perf_counter() - wall), done / (time.process_time() - cpu)


def tether_run(preset: str, steps: int, threads: int, overrides: list[str]) -> Speed:
    config, _ = load_config(
        preset,
        [
            f"schedule.total_steps={steps}",
            f"torch_threads={threads}",
            "device=cpu",
            "schedule.checkpoint_every=100000000",
            "training.save_replay=false",
            *overrides,
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, Path(tmp) / "run")
        return _timed(lambda: trainer.run().steps, steps)


def _lr(c: Any) -> Any:
    """The preset's learning rate as SB3 takes it (a linear schedule when annealed)."""
    rate = float(c.learning_rate)
    return (lambda remaining: rate * remaining) if c.anneal_lr else rate


def _sb3_common(c: Any, seed: int) -> dict[str, Any]:
    """The replay settings both SB3 learners take, from a Tether off-policy `training` section."""
    return {
        "learning_rate": _lr(c),
        "buffer_size": c.buffer_size,
        "learning_starts": c.learning_starts,
        "batch_size": c.batch_size,
        "tau": c.tau,
        "gamma": c.discount_factor,
        "train_freq": c.train_freq,
        "gradient_steps": c.gradient_steps,
        "n_steps": c.n_step,
        "device": "cpu",
        "seed": seed,
    }


def sb3_dqn(steps: int, threads: int, seed: int = 0) -> Speed:
    from stable_baselines3 import DQN

    c = cast(dqn.Config, load_config("cartpole-dqn")[0].training)
    torch.set_num_threads(threads)
    model = DQN(
        "MlpPolicy",
        "CartPole-v1",
        # Tether counts gradient steps between target syncs; SB3 counts env steps.
        target_update_interval=max(1, c.target_update_interval * c.train_freq // c.gradient_steps),
        exploration_fraction=c.epsilon_decay_steps / steps,
        exploration_initial_eps=c.epsilon_start,
        exploration_final_eps=c.epsilon_end,
        max_grad_norm=c.max_grad_norm or 1e9,
        policy_kwargs={"net_arch": list(c.net_arch), "activation_fn": torch.nn.ReLU},
        **_sb3_common(c, seed),
    )
    return _timed(lambda: model.learn(total_timesteps=steps) and steps, steps)


def sb3_sac(steps: int, threads: int, seed: int = 0) -> Speed:
    from stable_baselines3 import SAC

    c = cast(sac.Config, load_config("pendulum-sac")[0].training)
    torch.set_num_threads(threads)
    model = SAC(
        "MlpPolicy",
        "Pendulum-v1",
        ent_coef="auto" if c.ent_coef == "auto" else c.ent_coef,
        target_update_interval=c.target_update_interval,
        policy_kwargs={"net_arch": {"pi": list(c.actor_fc_layers), "qf": list(c.critic_fc_layers)}},
        **_sb3_common(c, seed),
    )
    return _timed(lambda: model.learn(total_timesteps=steps) and steps, steps)


def compare(name: str, ours: dict[str, Any], peer: Any, repeats: int) -> float:
    """Median speeds over `repeats` interleaved runs (so load changes hit every side alike) of each
    Tether variant in `ours` and of the peer, with the ratios; returns the peer's steps/s."""
    runs: dict[str, list[Speed]] = {label: [] for label in [*ours, "sb3"]}
    for _ in range(repeats):
        for label, run in ours.items():
            runs[label].append(run())
        runs["sb3"].append(peer())
    wall_p, cpu_p = (statistics.median(x) for x in zip(*runs["sb3"], strict=True))
    for label in ours:
        wall_o, cpu_o = (statistics.median(x) for x in zip(*runs[label], strict=True))
        print(
            f"{name:<22} {label:<9} wall: tether {wall_o:6.0f} sb3 {wall_p:6.0f} steps/s ratio "
            f"{wall_o / wall_p:5.2f}x | CPU: tether {cpu_o:6.0f} sb3 {cpu_p:6.0f} steps/CPU-s ratio "
            f"{cpu_o / cpu_p:5.2f}x"
        )
    return wall_p


def product_seconds(batch: int, width: int, dtype: torch.dtype, repeats: int = 200) -> float:
    """Seconds of one (batch × width) by (width × width) product at `dtype`, timed alone, on the
    route the learners' passes take (float32 in oneDNN where `onednn_float32_products`)."""
    a = torch.randn(batch, width).to(dtype)
    b = torch.randn(width, width).to(dtype)
    onednn = dtype == torch.float32 and onednn_float32_products(torch.device("cpu"))
    with onednn_products() if onednn else nullcontext():
        for _ in range(20):
            torch.mm(a, b)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        return (time.perf_counter() - start) / repeats


def ceiling(
    name: str, products_per_env_step: float, batch: int, width: int, peer_speed: float, native_bf16: bool
) -> None:
    """Print how far ahead of the peer the hidden-layer products alone let a learner be, in
    float32 and, on a CPU with native bfloat16 (where `precision=auto` uses it), in bfloat16;
    elsewhere bfloat16 products are emulated and much slower, and no learner here takes them."""
    for dtype in (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,):
        seconds = products_per_env_step * product_seconds(batch, width, dtype)
        print(
            f"{name:<22} ceiling   {str(dtype).removeprefix('torch.'):<8} {products_per_env_step:g} "
            f"products of {batch}x{width}x{width} per env step take {seconds * 1e3:5.2f} ms alone: "
            f"at most {1 / (peer_speed * seconds):4.2f}x sb3"
        )


def warm_up() -> None:
    """Pay the process's one-time costs before any timed run, so neither side is charged for
    them: the first `torch.optim.Adam` imports torch._dynamo (about a second)."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["dqn", "sac"], default=None)
    parser.add_argument("--dqn-steps", type=int, default=20_000)
    parser.add_argument("--sac-steps", type=int, default=3_000)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for both sides (tether train uses up to 2)"
    )
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warm_up()
    native = has_native_bf16(torch.device("cpu"))
    auto = "bfloat16 (AMX or AVX-512 BF16)" if native else "float32 (no native bfloat16): float32 runs alone"
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU; precision=auto multiplies in {auto}")
    route = "oneDNN (MKL runs AVX2 on this CPU)" if onednn_float32_products(torch.device("cpu")) else "MKL"
    print(f"wide float32 products run in {route}")

    precisions = ("float32", "auto") if native else ("float32",)

    def variants(preset: str, steps: int, extra: list[str]) -> dict[str, Any]:
        return {
            p: lambda p=p: tether_run(preset, steps, args.threads, [*extra, f"training.precision={p}"])
            for p in precisions
        }

    if args.only in (None, "dqn"):
        name = f"DQN CartPole-v1 ({args.dqn_steps // 1000}k)"
        peer = compare(
            name,
            variants("cartpole-dqn", args.dqn_steps, ["training.double_q=false"]),
            lambda: sb3_dqn(args.dqn_steps, args.threads),
            args.repeats,
        )
        dqn_c = cast(dqn.Config, load_config("cartpole-dqn")[0].training)
        # Per gradient step: the online pass forward and its two backward products, and the
        # target pass forward (no Double DQN here).
        per_env_step = 4 * dqn_c.gradient_steps / dqn_c.train_freq
        ceiling(name, per_env_step, dqn_c.batch_size, dqn_c.net_arch[1], peer, native)
    if args.only in (None, "sac"):
        name = f"SAC Pendulum-v1 ({args.sac_steps // 1000}k)"
        peer = compare(
            name,
            variants("pendulum-sac", args.sac_steps, []),
            lambda: sb3_sac(args.sac_steps, args.threads),
            args.repeats,
        )
        sac_c = cast(sac.Config, load_config("pendulum-sac")[0].training)
        # Per gradient step, in batch-sized products: the actor forward over s and s' (2) and
        # backward (2); the two target critics forward (2); the two critics forward (2) and
        # backward (4); the two critics forward at the actor's action (2) and back to it (2).
        ceiling(
            name,
            16 * sac_c.gradient_steps / sac_c.train_freq,
            sac_c.batch_size,
            sac_c.critic_fc_layers[1],
            peer,
            native,
        )


if __name__ == "__main__":
    main()
