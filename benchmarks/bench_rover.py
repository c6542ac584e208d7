"""Rover server throughput: decoded frames/s at the rover's full 424x240 (JPEG and raw) inline on
one core, on 1 decode worker and on the server's default pool (threads, batched as the server
batches), with processes and Pillow as peers; a per-frame cost breakdown; and seconds per PPO
update of 8,192 samples at the CPU test size.

    python benchmarks/bench_rover.py                        # everything, a few minutes on 2 cores
    taskset -c 1 python benchmarks/bench_rover.py --skip-ppo  # the per-core decode figures
    python benchmarks/bench_rover.py --ppo-peer             # also the PPO peer (encoder run twice)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from tether.ingest import rover_codec
from tether.ingest.rover_codec import (
    decode,
    decode_for_network,
    decode_jpeg,
    encode,
    parse_metadata,
    to_network_input,
)
from tether.ingest.rover_server import RoverServerConfig, tune_allocator
from tether.ingest.rover_sim import RoverWorld, WorldConfig

FULL = (424, 240)
CPU_TEST_SIZE = (106, 60)
DEFAULTS = RoverServerConfig()


def allowed_cores() -> int:
    """Cores this process may run on (taskset), where the OS says."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    return len(getaffinity(0)) if getaffinity else os.cpu_count() or 1


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


def server_decode(message: bytes, size: tuple[int, int] = FULL, jpeg_fast: bool = False) -> Any:
    """What a server decode worker does per message (`RoverServer._decode` minus bookkeeping)."""
    return decode_for_network(message, size, 10.0, jpeg_fast=jpeg_fast)


def _decode_batch(messages: list[bytes]) -> list[Any]:
    return [server_decode(m) for m in messages]


def _decode_batch_arrays(messages: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [server_decode(m)[1:] for m in messages]  # what a process would send back


def _pillow_batch(messages: list[bytes]) -> list[Any]:
    rover_codec._simplejpeg = None  # this process only (a worker of the Pillow pool)
    return _decode_batch(messages)


def _timed(run: Callable[[], int], seconds: float) -> tuple[float, float]:
    """(frames per wall-clock second, frames per CPU-second of this process). On a shared machine
    the second is the steadier figure: time the scheduler gave to other jobs is not counted."""
    run()  # warm-up (pool threads, caches)
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        done += run()
    return done / (time.perf_counter() - start), done / max(time.process_time() - cpu, 1e-9)


def inline_fps(
    messages: list[bytes], fn: Callable[[bytes], Any] = server_decode, seconds: float = 2.0
) -> tuple[float, float]:
    def run() -> int:
        for m in messages:
            fn(m)
        return len(messages)

    return _timed(run, seconds)


def pool_fps(
    messages: list[bytes],
    workers: int,
    batch: int = DEFAULTS.decode_batch,
    processes: bool = False,
    seconds: float = 2.0,
) -> tuple[float, float]:
    """The server's pattern: tasks of `batch` messages, results taken in order, at most about
    `queue_size` messages in flight. The CPU figure of a process pool counts only this process."""
    executor = ProcessPoolExecutor(workers) if processes else ThreadPoolExecutor(workers)
    fn = _decode_batch_arrays if processes else _decode_batch
    chunks = [messages[i : i + batch] for i in range(0, len(messages), batch)]
    depth = max(1, DEFAULTS.queue_size // batch)
    with executor as pool:

        def run() -> int:
            pending: deque[Future[list[Any]]] = deque()
            done = 0
            for chunk in chunks:
                pending.append(pool.submit(fn, chunk))
                if len(pending) >= depth:
                    done += len(pending.popleft().result())
            while pending:
                done += len(pending.popleft().result())
            return done

        return _timed(run, seconds)


def per_frame_breakdown(jpeg: list[bytes], raw: list[bytes]) -> dict[str, float]:
    """Microseconds per frame of each stage, one core, at 424x240."""

    def us(fn: Callable[[Any], Any], items: list[Any], seconds: float = 0.5) -> float:
        return 1e6 / inline_fps(items, fn, seconds)[1]  # CPU microseconds

    metas = [parse_metadata(m) for m in jpeg]
    jpegs = [m[off : off + meta["rgb_size"]] for m, (meta, off) in zip(jpeg, metas, strict=True)]
    raw_views = [decode(m, copy=False) for m in raw]
    out = {
        "parse header + JSON": us(parse_metadata, jpeg),
        "decode, raw RGB, copy=False (all validation, views)": us(lambda m: decode(m, copy=False), raw),
        "decode, raw RGB, copying RGB and depth": us(decode, raw),
        "JPEG decode (header check + simplejpeg)": us(
            lambda b: decode_jpeg(b, FULL[1], FULL[0], FULL), jpegs
        ),
        "JPEG decode, fast DCT + upsampling": us(
            lambda b: decode_jpeg(b, FULL[1], FULL[0], FULL, True), jpegs
        ),
        "network input (HWC->CHW copy, depth scale + clip)": us(
            lambda s: to_network_input(s.rgb, s.depth, FULL, 10.0), raw_views
        ),
        "whole message, JPEG": us(server_decode, jpeg),
        "whole message, raw": us(server_decode, raw),
    }
    return out


def bench_decode(n_messages: int, processes: bool) -> dict[str, tuple[float, float]]:
    workers = DEFAULTS.workers
    print(
        f"== decode + network input at {FULL[0]}x{FULL[1]} (JPEG q90 / raw), {os.cpu_count()} CPUs "
        f"(affinity {allowed_cores()}), jpeg backend {rover_codec.jpeg_backend()}, "
        f"decode batch {DEFAULTS.decode_batch}"
    )
    jpeg = make_messages(n_messages, compress=True)
    raw = make_messages(n_messages, compress=False)
    print(
        f"   message size: JPEG {np.mean([len(m) for m in jpeg]) / 1024:.0f} KiB, "
        f"raw {np.mean([len(m) for m in raw]) / 1024:.0f} KiB"
    )
    print("   per frame, CPU time on one core:")
    for label, value in per_frame_breakdown(jpeg, raw).items():
        print(f"      {label:52s} {value:7.0f} us")
    rows: dict[str, tuple[float, float]] = {}
    # The peer first: glibc's default allocator settings cannot be restored once tuned.
    for label, msgs in (("jpeg", jpeg), ("raw", raw)):
        rows[f"{label} default pool, untuned malloc (peer)"] = pool_fps(msgs, workers)
    print(f"   allocator tuned as the server does: {tune_allocator()}")
    for label, msgs in (("jpeg", jpeg), ("raw", raw)):
        rows[f"{label} inline (one core)"] = inline_fps(msgs)
        rows[f"{label} 1 worker"] = pool_fps(msgs, 1)
        rows[f"{label} default pool ({workers} threads)"] = pool_fps(msgs, workers)
        rows[f"{label} default pool, batch 1 (peer)"] = pool_fps(msgs, workers, batch=1)
        if processes:
            rows[f"{label} {workers} processes (peer)"] = pool_fps(msgs, workers, processes=True)
    rows["jpeg inline, fast DCT"] = inline_fps(jpeg, lambda m: server_decode(m, jpeg_fast=True))
    rows[f"jpeg inline at {CPU_TEST_SIZE[0]}x{CPU_TEST_SIZE[1]} (DCT-scaled)"] = inline_fps(
        jpeg, lambda m: server_decode(m, CPU_TEST_SIZE)
    )
    if rover_codec._simplejpeg is not None:
        saved = rover_codec._simplejpeg
        rover_codec._simplejpeg = None
        try:
            rows["jpeg inline, Pillow (peer)"] = inline_fps(jpeg)
        finally:
            rover_codec._simplejpeg = saved
    print(f"   {'':44s} {'wall':>8s} {'per CPU-s':>10s}  frames/s")
    for label, (wall, cpu) in rows.items():
        print(f"   {label:44s} {wall:8.0f} {cpu:10.0f}")
    cores = allowed_cores()
    for label in ("jpeg", "raw"):
        one = rows[f"{label} inline (one core)"][1]
        pool = rows[f"{label} default pool ({workers} threads)"][0]
        print(
            f"   {label}: one core {one:.0f} frames/s -> 2 cores about {2 * one:.0f} (computed); "
            f"default pool measured {pool:.0f} on {cores} allowed core(s), shared; target 2,000"
        )
    return rows


def bench_ppo(samples: int, size: tuple[int, int], threads: int, peer: bool) -> dict[str, float]:
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
    obs: dict[str, np.ndarray] = {
        "rgb": rng.integers(0, 256, (samples, 1, 3, h, w), dtype=np.uint8),
        "depth": rng.random((samples, 1, 1, h, w), dtype=np.float32),
        "proprio": rng.standard_normal((samples, 1, 6)).astype(np.float32),
    }
    results = {}
    variants: list[tuple[str, type[RgbdActorCritic]]] = [("shared encoder pass", RgbdActorCritic)]
    if peer:
        variants.append(("encoder twice (peer)", NoReuse))
    for label, cls in variants:
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
    if peer:
        print(
            f"   ratio peer / ours: {results['encoder twice (peer)'] / results['shared encoder pass']:.2f}x"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=64)
    parser.add_argument("--ppo-samples", type=int, default=8192)
    parser.add_argument("--ppo-size", default=f"{CPU_TEST_SIZE[0]}x{CPU_TEST_SIZE[1]}")
    parser.add_argument("--threads", type=int, default=allowed_cores())
    parser.add_argument("--processes", action="store_true", help="also time a process pool (peer)")
    parser.add_argument("--ppo-peer", action="store_true", help="also time PPO with the encoder run twice")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-ppo", action="store_true")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    figures: dict[str, Any] = {}
    if not args.skip_decode:
        figures["decode_fps"] = bench_decode(args.messages, args.processes)
    if not args.skip_ppo:
        w, h = (int(x) for x in args.ppo_size.lower().split("x"))
        figures["ppo_update_s"] = bench_ppo(args.ppo_samples, (w, h), args.threads, args.ppo_peer)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
