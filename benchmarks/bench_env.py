"""Lunabotics env throughput: the batched numpy env at several widths against its single-env view.

    .venv/bin/python benchmarks/bench_env.py [--seconds 3] [--actions random|forward]

Prints agent env-steps per second (each agent step is `frame_skip` physics steps plus the sensor)
and the speed-up of the 4096-arena batch over the single-env view measured in the same run.
`--actions forward` drives every rover at full speed with random steering, which sends most of
them into the obstacle field (more collision work than uniform random actions).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tether.envs.lunabotics import LunaboticsEnv, LunaboticsVectorEnv


def _actions(rng: np.random.Generator, n: int, mode: str, pool: int = 64) -> list[np.ndarray]:
    acts = rng.uniform(-1.0, 1.0, size=(pool, n, 3)).astype(np.float32)
    acts[..., 2] = rng.uniform(0.0, 1.0, size=(pool, n))
    if mode == "forward":
        acts[..., 0] = 1.0
        acts[..., 1] *= 0.3
    return list(acts)


def bench_batched(n: int, seconds: float, mode: str) -> tuple[float, float]:
    """(env-steps/s by wall clock, by process CPU time)."""
    env = LunaboticsVectorEnv(n)
    env.reset(seed=0)
    acts = _actions(np.random.default_rng(0), n, mode)
    for a in acts[:8]:  # warm-up
        env.step(a)
    steps = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        for a in acts:
            env.step(a)
        steps += len(acts)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return steps * n / wall, steps * n / cpu


def bench_single(seconds: float, mode: str) -> tuple[float, float]:
    env = LunaboticsEnv()
    env.reset(seed=0)
    acts = [a[0] for a in _actions(np.random.default_rng(0), 1, mode, pool=256)]
    steps = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        for a in acts:
            _, _, term, trunc, _ = env.step(a)
            if term or trunc:
                env.reset()
        steps += len(acts)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return steps / wall, steps / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per configuration")
    parser.add_argument("--actions", choices=("random", "forward"), default="random")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 64, 1024, 4096])
    args = parser.parse_args()

    print(f"Lunabotics env, {args.actions} actions, {args.seconds:.0f} s per row")
    print(f"{'view':>22} {'env-steps/s':>14} {'(cpu time)':>14} {'ms/step':>9}")
    single, single_cpu = bench_single(args.seconds, args.actions)
    print(f"{'single env':>22} {single:>14,.0f} {single_cpu:>14,.0f} {1e3 / single:>9.3f}")
    results = {}
    for n in args.widths:
        sps, sps_cpu = bench_batched(n, args.seconds, args.actions)
        results[n] = (sps, sps_cpu)
        print(f"{f'batched x{n}':>22} {sps:>14,.0f} {sps_cpu:>14,.0f} {1e3 * n / sps:>9.3f}")
    widest = max(results)
    sps, sps_cpu = results[widest]
    print(
        f"batched x{widest} / single env: {sps / single:,.0f}x by wall clock, "
        f"{sps_cpu / single_cpu:,.0f}x by CPU time"
    )


if __name__ == "__main__":
    main()
