"""Check an exported model against the PyTorch policy it came from, and optimise ONNX graphs.

The exported file runs in its own runtime (ONNX Runtime, LiteRT) on N random observations from
the observation space and N recorded ones (from the job's environment or a calibration file);
every output is compared with the PyTorch policy on the same inputs.

Tolerances (see docs/export.md): an element passes when |exported - torch| <= atol + rtol·|torch|;
a discrete action passes by agreement (the share of rows with the same action).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tether.export.onnx import TensorSpec, as_input_dict, batch_size, sample_observations, take_rows
from tether.export.runtime import ExportError, load_runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_agreement: float  # share of rows whose action must agree (discrete: equal; Box: within tolerance)


# fp32 is exact up to float rounding. FP16 keeps ~3 significant digits through each layer. INT8
# error grows with layer width and input range; its continuous-action tolerance is loose by
# nature, so INT8 is judged mostly by agreement. Measured figures are in docs/export.md.
TOLERANCES: dict[str, Tolerance] = {
    "onnx": Tolerance(atol=1e-5, rtol=1e-5, min_agreement=1.0),
    "onnx-optimized": Tolerance(atol=1e-5, rtol=1e-5, min_agreement=1.0),
    "onnx-fp16": Tolerance(atol=1e-2, rtol=1e-2, min_agreement=0.98),
    "onnx-int8": Tolerance(atol=5e-2, rtol=5e-2, min_agreement=0.95),
    "tflite": Tolerance(atol=1e-5, rtol=1e-5, min_agreement=1.0),
    "rknn": Tolerance(atol=1e-2, rtol=1e-2, min_agreement=0.98),
}


@dataclass
class VerifyReport:
    format: str
    file: str
    provider: str
    n_random: int
    n_recorded: int
    max_abs_diff: float | None  # over float outputs (Box actions, Q-values); None if there are none
    max_abs_diff_random: float | None
    max_abs_diff_recorded: float | None
    action_agreement: float  # over all rows
    action_agreement_random: float | None
    action_agreement_recorded: float | None
    within_tolerance: float  # share of float output elements within tolerance (on the judged rows)
    tolerance: dict[str, float]
    judged_on: str  # "all" rows, or "recorded" rows only (lossy formats with recorded data)
    near_ties: int  # discrete disagreements where PyTorch's two Q-values were within tolerance
    passed: bool
    latency_us: float | None = None  # median batch-1 latency in the runtime
    outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def accuracy(self) -> dict[str, Any]:
        """What goes into a sidecar."""
        return {
            "max_abs_diff": self.max_abs_diff,
            "action_agreement": self.action_agreement,
            "action_agreement_recorded": self.action_agreement_recorded,
            "judged_on": self.judged_on,
            "near_ties": self.near_ties,
            "n_random": self.n_random,
            "n_recorded": self.n_recorded,
            "tolerance": self.tolerance,
            "passed": self.passed,
        }


def _max_diff(ref: np.ndarray, got: np.ndarray, rows: slice) -> float | None:
    if ref[rows].size == 0:
        return None
    return float(np.max(np.abs(got[rows].astype(np.float64) - ref[rows].astype(np.float64))))


def compare_outputs(
    fmt: str,
    file: str,
    provider: str,
    specs: list[TensorSpec],
    reference: list[np.ndarray],
    candidate: list[np.ndarray],
    n_random: int,
    n_recorded: int,
) -> VerifyReport:
    """Compare exported outputs with PyTorch's (rows: `n_random` random, then `n_recorded` recorded).

    Exact formats (fp32) must hold every element on every row. Lossy formats (FP16, INT8) are
    judged on the recorded rows when there are any: static INT8 is calibrated for the observations
    the robot meets, and random points far outside that range say little about deployment.
    """
    tol = TOLERANCES.get(fmt, TOLERANCES["onnx"])
    if len(reference) != len(candidate):
        raise ExportError(
            f"{file} has {len(candidate)} outputs; the policy has {len(reference)}; export it again."
        )
    exact = tol.min_agreement >= 1.0
    judged = slice(n_random, None) if (n_recorded and not exact) else slice(None)
    diffs: dict[str, list[float | None]] = {"all": [], "random": [], "recorded": []}
    within: list[np.ndarray] = []
    agree_rows: np.ndarray | None = None
    for spec, ref, got in zip(specs, reference, candidate, strict=True):
        got = np.asarray(got)
        if got.shape != ref.shape:
            raise ExportError(
                f"{file} output '{spec.name}' has shape {got.shape}; the policy gives {ref.shape}."
            )
        if not np.issubdtype(ref.dtype, np.floating):
            if spec.name == "action":
                agree_rows = (got == ref).reshape(ref.shape[0], -1).all(axis=1)
            continue
        err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        ok = (err <= tol.atol + tol.rtol * np.abs(ref.astype(np.float64))) & np.isfinite(got)
        within.append(ok)
        diffs["all"].append(_max_diff(ref, got, slice(None)))
        diffs["random"].append(_max_diff(ref, got, slice(0, n_random)))
        diffs["recorded"].append(_max_diff(ref, got, slice(n_random, None)))
        if spec.name == "action":
            agree_rows = ok.reshape(ok.shape[0], -1).all(axis=1)

    def worst(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return max(present) if present else None

    def share(rows: np.ndarray | None, part: slice) -> float | None:
        if rows is None:
            return 1.0
        return float(np.mean(rows[part])) if rows[part].size else None

    # A Q-network whose two best actions are closer than the format resolves picks either: such
    # a flip is a near-tie, not an error (the chosen action is within tolerance of the best).
    near_tie_rows = _near_ties(specs, reference, candidate, tol)
    near_ties = (
        int(np.sum(near_tie_rows & ~agree_rows))
        if (near_tie_rows is not None and agree_rows is not None)
        else 0
    )
    judged_rows = (
        agree_rows | near_tie_rows if (near_tie_rows is not None and agree_rows is not None) else agree_rows
    )
    agreement = share(agree_rows, slice(None)) or 0.0
    judged_agreement = share(judged_rows, judged) or 0.0
    judged_within = np.concatenate([w[judged].ravel() for w in within]) if within else np.ones(1, bool)
    within_share = float(np.mean(judged_within)) if judged_within.size else 1.0
    if exact:
        passed = judged_agreement >= 1.0 and within_share == 1.0
    else:
        passed = judged_agreement >= tol.min_agreement and within_share >= tol.min_agreement
    return VerifyReport(
        format=fmt,
        file=file,
        provider=provider,
        n_random=n_random,
        n_recorded=n_recorded,
        max_abs_diff=worst(diffs["all"]),
        max_abs_diff_random=worst(diffs["random"]),
        max_abs_diff_recorded=worst(diffs["recorded"]),
        action_agreement=agreement,
        action_agreement_random=share(agree_rows, slice(0, n_random)),
        action_agreement_recorded=share(agree_rows, slice(n_random, None)) if n_recorded else None,
        within_tolerance=within_share,
        tolerance={"atol": tol.atol, "rtol": tol.rtol, "min_agreement": tol.min_agreement},
        judged_on="recorded" if judged.start else "all",
        near_ties=near_ties,
        passed=passed,
        outputs=[s.name for s in specs],
    )


def _near_ties(
    specs: list[TensorSpec], reference: list[np.ndarray], candidate: list[np.ndarray], tol: Tolerance
) -> np.ndarray | None:
    """Rows where the exported action's reference Q-value is within tolerance of the best one."""
    names = [s.name for s in specs]
    if "q_values" not in names or "action" not in names:
        return None
    q = reference[names.index("q_values")].astype(np.float64)
    chosen = np.asarray(candidate[names.index("action")]).astype(np.int64).reshape(-1)
    if (
        q.ndim != 2
        or chosen.shape[0] != q.shape[0]
        or chosen.min(initial=0) < 0
        or chosen.max(initial=0) >= q.shape[1]
    ):
        return None
    best = q.max(axis=1)
    picked = q[np.arange(q.shape[0]), chosen]
    result: np.ndarray = best - picked <= tol.atol + tol.rtol * np.abs(best)
    return result


def verification_inputs(
    observation_space: Any, in_specs: list[TensorSpec], n: int, recorded: Any | None, seed: int = 0
) -> tuple[dict[str, np.ndarray], int, int]:
    """`n` random observations followed by up to `n` recorded ones, keyed by input name."""
    names = [s.name for s in in_specs]
    random_obs = as_input_dict(sample_observations(observation_space, n, seed), names)
    if recorded is None or batch_size(recorded) == 0:
        return random_obs, n, 0
    rec = as_input_dict(take_rows(recorded, slice(0, n)), names)
    n_rec = batch_size(rec)
    joined = {k: np.concatenate([random_obs[k], rec[k].astype(random_obs[k].dtype)]) for k in names}
    return joined, n, n_rec


def measure_latency(
    runtime: Any, obs: dict[str, np.ndarray] | np.ndarray, repeats: int = 300, warmup: int = 30
) -> float:
    """Median wall time of one `runtime.run` call on a single observation, in microseconds."""
    for _ in range(warmup):
        runtime.run(obs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runtime.run(obs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def verify_model(
    path: Path,
    fmt: str,
    graph: Any,
    observation_space: Any,
    in_specs: list[TensorSpec],
    out_specs: list[TensorSpec],
    *,
    n: int = 256,
    recorded: Any | None = None,
    provider: str = "cpu",
    seed: int = 0,
    latency: bool = True,
) -> VerifyReport:
    """Run the exported file in its runtime and compare with the PyTorch graph
    (`tether.export.onnx.PolicyGraph`) on the same random and recorded observations."""
    from tether.export.onnx import torch_outputs

    if n < 1:
        raise ExportError("verification needs at least one observation (n >= 1).")
    inputs, n_random, n_recorded = verification_inputs(observation_space, in_specs, n, recorded, seed)
    names = [s.name for s in in_specs]
    reference = torch_outputs(graph, inputs, names)
    runtime = load_runtime(path, provider=provider)
    outs = runtime.run_all(inputs)
    candidate = [outs[s.name] for s in out_specs]
    report = compare_outputs(
        fmt, path.name, runtime.provider, out_specs, reference, candidate, n_random, n_recorded
    )
    if latency:
        single = {k: v[0] for k, v in inputs.items()}
        report.latency_us = measure_latency(runtime, single if len(names) > 1 else single[names[0]])
    log.info(
        "verified %s: max abs diff %s, action agreement %.4f, %s",
        path.name,
        report.max_abs_diff,
        report.action_agreement,
        "passed" if report.passed else "FAILED",
    )
    return report


OPTIMIZATION_LEVELS = ("basic", "extended", "all")


def optimize_onnx(src: Path, dst: Path, level: str = "basic") -> dict[str, Any]:
    """Save ONNX Runtime's optimised graph of `src` to `dst` (SessionOptions.optimized_model_filepath).

    `basic` (constant folding, redundant-node removal) stays a portable ONNX graph; `extended`
    and `all` add ONNX Runtime's fused kernels, which only ONNX Runtime on the same kind of
    hardware can load.
    """
    import onnxruntime as ort

    from tether.checkpoint import atomic_write_bytes

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise ExportError(
            f"unknown optimisation level '{level}'; choose one of: {', '.join(OPTIMIZATION_LEVELS)}."
        )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tether-opt-") as tmp:
        target = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = str(target)
        options.log_severity_level = 3
        try:
            ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        except Exception:
            raise ExportError(
                f"{src} is not a readable ONNX model: it is truncated or corrupt; export it again."
            ) from None
        atomic_write_bytes(dst, target.read_bytes())
    return {"level": level, "onnxruntime_version": ort.__version__}


def record_observations(
    learner: Any, config: Any, n: int = 256, seed: int = 0, num_envs: int = 8
) -> Any | None:
    """Observations the policy actually meets: `n` rows from the job's environment, stepped with
    the learner's exploring policy (wider coverage than the greedy one). None if the environment
    cannot be built here."""
    from tether.envs import make_vector_env
    from tether.errors import TetherError

    try:
        env = make_vector_env(config.environment.model_copy(update={"num_envs": num_envs}), config.rewards)
    except (TetherError, ImportError, OSError) as exc:
        log.info(
            "cannot build %s to record observations (%s); verifying on random observations only",
            config.environment.id,
            exc,
        )
        return None
    rows: list[Any] = []
    try:
        obs, _ = env.reset(seed=seed)
        while sum(batch_size(r) for r in rows) < n:
            rows.append(obs)
            obs, *_ = env.step(learner.act(obs, explore=True).action)
    finally:
        env.close()
    if isinstance(rows[0], dict):
        joined: Any = {k: np.concatenate([r[k] for r in rows])[:n] for k in rows[0]}
    else:
        joined = np.concatenate(rows)[:n].astype(np.float32)
    return joined
