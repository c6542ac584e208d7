"""Inference latency of the Lunabotics policy: eager PyTorch vs ONNX Runtime (FP32, FP16, INT8).

The policy is the Lunabotics PPO actor as trained (28 → 256 → 256 → 3, tanh, observation
normaliser and action clipping inside), exported with `tether.export`. Every engine runs on one
thread in this process. Each figure is the best of several timing rounds (each round the mean of
many calls), which filters out other processes on a shared machine.

ONNX Runtime is timed three ways: `load_runtime(...).run(obs)` (Tether's API: a shape check,
then its own bound buffers and a `RunOptions` made once for a single observation),
`session.run` with the output name bound once, and `run_with_iobinding` with input and output
buffers bound once (the device loop: copy the new observation into the bound buffer, run, read
the bound action buffer).

    python benchmarks/bench_inference.py            # prints a table and ratios vs eager torch
    python benchmarks/bench_inference.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from tether.algos import ppo
from tether.config import EnvironmentConfig
from tether.envs import make_vector_env
from tether.export.onnx import export_learner
from tether.export.runtime import load_runtime

TARGET_US = 15.0
TARGET_SPEEDUP = 3.0


def best_us(fn: Callable[[], Any], calls: int, rounds: int) -> tuple[float, float]:
    """Best of `rounds` rounds of the mean wall time and the mean CPU time of this process per
    call, in microseconds. Every engine runs on the calling thread, so CPU time is the work
    itself even when other processes take the core away (wall time then includes the wait)."""
    for _ in range(max(10, calls // 10)):
        fn()
    wall = cpu = float("inf")
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        wall = min(wall, (time.perf_counter() - start) / calls)
        cpu = min(cpu, (time.process_time() - start_cpu) / calls)
    return wall * 1e6, cpu * 1e6


def build_policy(tmp: Path) -> tuple[Any, dict[str, Path], np.ndarray]:
    """The Lunabotics PPO learner with a normaliser fitted on real env observations, exported."""
    env = make_vector_env(EnvironmentConfig(id="tether/Lunabotics-v0", num_envs=16))
    learner = ppo.build(ppo.Config(), env.single_observation_space, env.single_action_space, "cpu", 0)
    obs, _ = env.reset(seed=0)
    rows = []
    for _ in range(32):
        rows.append(obs)
        obs, *_ = env.step(learner.act(obs).action)
    env.close()
    recorded = np.concatenate(rows).astype(np.float32)
    assert learner.obs_norm is not None
    learner.obs_norm.update(recorded)
    space = (env.single_observation_space, env.single_action_space)
    paths = {"onnx fp32": export_learner(learner, *space, tmp, "onnx", n_verify=16)[0].path}
    paths["onnx fp16"] = export_learner(learner, *space, tmp, "onnx-fp16", n_verify=16)[-1].path
    paths["onnx int8 dynamic"] = export_learner(learner, *space, tmp, "onnx-int8", n_verify=16, name="dyn")[
        -1
    ].path
    paths["onnx int8 static"] = export_learner(
        learner, *space, tmp, "onnx-int8", n_verify=16, name="static", calibration={"obs": recorded}
    )[-1].path
    return learner, paths, recorded


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def iobinding_runner(sess: ort.InferenceSession, batch: np.ndarray) -> Callable[[], Any]:
    """Bind the input and output buffers once; each call copies the observation in and runs."""
    source = np.ascontiguousarray(batch, dtype=np.float32)
    bound_in = np.empty_like(source)
    bound_out = np.empty((source.shape[0], 3), np.float32)
    binding = sess.io_binding()
    binding.bind_input("obs", "cpu", 0, np.float32, list(bound_in.shape), bound_in.ctypes.data)
    binding.bind_output("action", "cpu", 0, np.float32, list(bound_out.shape), bound_out.ctypes.data)

    def run() -> np.ndarray:
        np.copyto(bound_in, source)
        sess.run_with_iobinding(binding)
        return bound_out

    run()
    np.testing.assert_allclose(bound_out, sess.run(["action"], {"obs": source})[0], rtol=0, atol=0)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing round at batch 1")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        learner, paths, recorded = build_policy(Path(tmp))
        policy = learner.policy()
        results: dict[str, dict[str, tuple[float, float]]] = {}
        for batch in (1, 256):
            obs = np.ascontiguousarray(np.resize(recorded, (batch, 28)))
            calls = args.calls if batch == 1 else max(50, args.calls // 20)
            x = torch.from_numpy(obs)

            def eager(x: torch.Tensor = x) -> Any:
                with torch.inference_mode():
                    return policy(x)

            row = {"torch eager": best_us(eager, calls, args.rounds)}
            for name, path in paths.items():
                sess = session(path)
                feed = {"obs": obs}
                outputs = ["action"]
                row[f"{name} session.run"] = best_us(
                    functools.partial(sess.run, outputs, feed), calls, args.rounds
                )
                row[f"{name} iobinding"] = best_us(iobinding_runner(sess, obs), calls, args.rounds)
            runtime = load_runtime(paths["onnx fp32"], provider="cpu")
            single = obs[0] if batch == 1 else obs
            row["onnx fp32 load_runtime().run"] = best_us(
                functools.partial(runtime.run, single), calls, args.rounds
            )
            results[f"batch {batch}"] = row
    eager1 = results["batch 1"]["torch eager"][0]
    best_ort = min(v[0] for k, v in results["batch 1"].items() if k.startswith("onnx fp32"))
    best_ort_cpu = min(v[1] for k, v in results["batch 1"].items() if k.startswith("onnx fp32"))
    summary = {
        "ort_fp32_batch1_best_us": best_ort,
        "ort_fp32_batch1_best_cpu_us": best_ort_cpu,
        "speedup_vs_eager_batch1": eager1 / best_ort,
        "load_average_1min": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "meets_latency_target": best_ort <= TARGET_US,
        "meets_speedup_target": eager1 / best_ort >= TARGET_SPEEDUP,
        "ort_version": ort.__version__,
        "torch_version": torch.__version__,
    }
    if args.json:
        print(json.dumps({"results": results, "summary": summary}))
        return
    print(f"load average {summary['load_average_1min']:.1f} on {summary['cpu_count']} cores")
    for label, row in results.items():
        base = row["torch eager"][0]
        n = int(label.split()[1])
        print(f"\n{label}: µs per call (best of {args.rounds} rounds); ratio = torch eager / engine (wall)")
        print(f"  {'engine':38s} {'wall':>10s} {'cpu':>10s} {'ratio':>7s}")
        for name, (us, cpu) in row.items():
            per_obs = f"  ({us / n:.3f} µs/obs)" if n > 1 else ""
            print(f"  {name:38s} {us:10.2f} {cpu:10.2f}  x{base / us:5.2f}{per_obs}")
    verdict = {True: "met", False: "NOT met"}
    print(
        f"\nONNX Runtime fp32 batch 1: {best_ort:.2f} µs wall, {best_ort_cpu:.2f} µs CPU; "
        f"target ≤ {TARGET_US:.0f} µs: {verdict[summary['meets_latency_target']]} (wall), "
        f"{verdict[best_ort_cpu <= TARGET_US]} (CPU)"
    )
    print(
        f"{summary['speedup_vs_eager_batch1']:.1f}× faster than eager torch at batch 1 "
        f"(target ≥ {TARGET_SPEEDUP:.0f}×: {verdict[summary['meets_speedup_target']]})"
    )


if __name__ == "__main__":
    main()
