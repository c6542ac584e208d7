"""Rover server throughput: decoded frames/s at the rover's full 424x240 (JPEG and raw, 1 and 2
decode workers, threads vs processes, simplejpeg vs Pillow) and seconds per PPO update of 8,192
samples at the CPU test size, each with its peer measured in the same run.

    python benchmarks/bench_rover.py                    # everything (the PPO update takes minutes on CPU)
    python benchmarks/bench_rover.py --ppo-samples 2048 # a shorter PPO measurement
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from tether.ingest import rover_codec
from tether.ingest.rover_codec import decode, encode, to_network_input
from tether.ingest.rover_sim import RoverWorld, WorldConfig

FULL = (424, 240)


def make_messages(n: int, compress: bool) -> list[bytes]:
    world = RoverWorld(WorldConfig(image_size=FULL), seed=0)
    frame = world.reset()
    rng = np.random.default_rng(0)
    out = []
    for step in range(n):
        action = rng.uniform(-1, 1, 2).astype(np.float32)
        out.append(
            encode(
                frame.rgb,
                frame.depth,
                frame.proprio,
                action,
                reward=0.1,
                done=False,
                episode_step=step,
                log_prob=-1.0,
                compress=compress,
                jpeg_quality=90,
            )
        )
        frame, *_ = world.step(np.array([0.6, 0.3]))
    return out


def server_decode(message: bytes) -> int:
    """What a server decode worker does per message (validate, decode, network input at 424x240)."""
    sample = decode(message, rgb_min_size=FULL)
    rgb, depth = to_network_input(sample.rgb, sample.depth, FULL, 10.0)
    return rgb.shape[1] + depth.shape[1]


def _pillow_decode(message: bytes) -> int:
    rover_codec._simplejpeg = None  # this process only (a worker of the Pillow pool)
    return server_decode(message)


def frames_per_second(
    messages: list[bytes], pool: Executor | None, fn: Any = server_decode, seconds: float = 3.0
) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        if pool is None:
            for m in messages:
                fn(m)
        else:
            list(pool.map(fn, messages, chunksize=4))
        done += len(messages)
    return done / (time.perf_counter() - start)


def bench_decode(n_messages: int) -> None:
    print(
        f"== decode at {FULL[0]}x{FULL[1]} (JPEG q90 / raw), {os.cpu_count()} CPUs, "
        f"jpeg backend {rover_codec.jpeg_backend()}"
    )
    jpeg = make_messages(n_messages, compress=True)
    raw = make_messages(n_messages, compress=False)
    print(
        f"   message size: JPEG {np.mean([len(m) for m in jpeg]) / 1024:.0f} KiB, "
        f"raw {np.mean([len(m) for m in raw]) / 1024:.0f} KiB"
    )
    rows: dict[str, float] = {}
    for label, msgs in (("jpeg", jpeg), ("raw", raw)):
        rows[f"{label} 1 thread"] = frames_per_second(msgs, None)
        with ThreadPoolExecutor(2) as pool:
            rows[f"{label} 2 threads"] = frames_per_second(msgs, pool)
        with ProcessPoolExecutor(2) as ppool:
            list(ppool.map(server_decode, msgs[:2]))  # warm the workers
            rows[f"{label} 2 processes"] = frames_per_second(msgs, ppool)
    saved = rover_codec._simplejpeg
    if saved is not None:
        rover_codec._simplejpeg = None
        try:
            rows["jpeg 1 thread (Pillow)"] = frames_per_second(jpeg, None)
            with ThreadPoolExecutor(2) as pool:
                rows["jpeg 2 threads (Pillow)"] = frames_per_second(jpeg, pool)
        finally:
            rover_codec._simplejpeg = saved
    for label, fps in rows.items():
        print(f"   {label:28s} {fps:8.0f} frames/s")
    print(f"   ratio jpeg 2 threads / 1 thread:      {rows['jpeg 2 threads'] / rows['jpeg 1 thread']:.2f}x")
    print(
        f"   ratio jpeg 2 threads / 2 processes:   {rows['jpeg 2 threads'] / rows['jpeg 2 processes']:.2f}x"
    )
    print(f"   ratio raw 2 threads / 1 thread:       {rows['raw 2 threads'] / rows['raw 1 thread']:.2f}x")
    if "jpeg 1 thread (Pillow)" in rows:
        print(
            "   ratio simplejpeg / Pillow (1 thread): "
            f"{rows['jpeg 1 thread'] / rows['jpeg 1 thread (Pillow)']:.2f}x"
        )
    best = max(rows["jpeg 2 threads"], rows["jpeg 2 processes"])
    raw2 = rows["raw 2 threads"]
    print(
        f"   target 2,000 frames/s: JPEG best {best:.0f} ({'met' if best >= 2000 else 'not met'}), "
        f"raw 2 threads {raw2:.0f} ({'met' if raw2 >= 2000 else 'not met'})"
    )


def bench_ppo(samples: int, size: tuple[int, int], threads: int) -> None:
    import gymnasium as gym

    from tether.algos.base import Transitions
    from tether.algos.ppo import PPO, Config
    from tether.nets_rgbd import RgbdActorCritic, rgbd_observation_space

    class NoReuse(RgbdActorCritic):
        """The peer: the same network computing the encoder twice (distribution, then value)."""

        def _shared_features(self, obs: Any) -> torch.Tensor:
            self._feature_cache = None
            return self.features(obs)

    torch.set_num_threads(threads)
    w, h = size
    print(
        f"== PPO update: {samples} samples at {w}x{h}, 4 epochs, minibatch 256, "
        f"{threads} torch thread(s), CPU"
    )
    rng = np.random.default_rng(0)
    obs = {
        "rgb": rng.integers(0, 256, (samples, 1, 3, h, w), dtype=np.uint8),
        "depth": rng.random((samples, 1, 1, h, w), dtype=np.float32),
        "proprio": rng.standard_normal((samples, 1, 6)).astype(np.float32),
    }
    results = {}
    for label, cls in (("shared encoder pass", RgbdActorCritic), ("encoder twice (peer)", NoReuse)):
        torch.manual_seed(0)
        ppo = PPO(
            Config(rollout_steps=samples, batch_size=256, num_epochs=4, normalize_obs=False, ent_coef=0.01),
            rgbd_observation_space(size),
            gym.spaces.Box(-1, 1, (2,), np.float32),
            actor_critic=cls(),
        )
        for t in range(samples):
            row = {k: v[t] for k, v in obs.items()}
            ppo.observe(
                Transitions(
                    row,
                    rng.uniform(-1, 1, (1, 2)).astype(np.float32),
                    np.array([0.1]),
                    row,
                    np.array([False]),
                    np.array([t % 64 == 63]),
                    {"logp": np.array([-1.0], np.float32), "value": np.array([0.0], np.float32)},
                )
            )
        start = time.perf_counter()
        ppo.update()
        results[label] = time.perf_counter() - start
        print(f"   {label:24s} {results[label]:8.1f} s per update ({samples / results[label]:.0f} samples/s)")
    print(f"   ratio peer / ours: {results['encoder twice (peer)'] / results['shared encoder pass']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=64)
    parser.add_argument("--ppo-samples", type=int, default=8192)
    parser.add_argument("--ppo-size", default="106x60")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-ppo", action="store_true")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    if not args.skip_decode:
        bench_decode(args.messages)
    if not args.skip_ppo:
        w, h = (int(x) for x in args.ppo_size.lower().split("x"))
        bench_ppo(args.ppo_samples, (w, h), args.threads)


if __name__ == "__main__":
    main()
