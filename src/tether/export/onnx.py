"""Export a learner's deterministic policy to a single-file ONNX model with a JSON sidecar.

The exported graph is exactly `learner.policy()`: raw observations in (normalisation is inside),
actions in the env's scale out, a dynamic batch axis on every input and output. A Box observation
is one input named `obs`; a Dict observation is one input per key. The outputs are `action`
(float32 for Box actions, int64 for Discrete ones) and, for a Q-network (a policy that returns
one float per discrete action), also `q_values`.

The sidecar `<model file>.json` (for example `policy.onnx.json`) tells a device everything it
needs without Tether: input/output names, dtypes and shapes, the observation and action spaces,
the normaliser statistics (informational: they are already applied inside the graph), the
format, opset, Tether version, the model's SHA-256 and the training metrics of the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from tether import __version__
from tether.checkpoint import atomic_write_bytes, atomic_write_text
from tether.export.runtime import SIDECAR_FORMAT, ExportError, sha256_file, sidecar_path

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "ExportError",
    "ExportResult",
    "PolicyGraph",
    "TensorSpec",
    "export_onnx",
    "normalizer_stats",
    "sample_observations",
    "sidecar_path",
    "space_spec",
    "write_sidecar",
]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "tflite", "rknn", "qtable-json")
# 17 loads in every ONNX Runtime since 1.12, rknn-toolkit2, TensorRT 8.5+ and OpenVINO.
DEFAULT_OPSET = 17
MIN_OPSET = 11
# torch's TorchScript exporter takes ~0.1 s for a policy, the dynamo exporter 5-20 s (a trainer
# exports after updates), and dynamo writes opset 18 natively and cannot always convert down. So
# `auto` uses TorchScript while torch ships it (deprecated, still in 2.13) and dynamo after.
DYNAMO_MIN_OPSET = 18
SIDECAR_VERSION = 1


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | None]  # None is the dynamic batch axis

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class ExportResult:
    """One exported file and what is known about it."""

    format: str
    path: Path
    sidecar_path: Path
    size_bytes: int
    sha256: str
    sidecar: dict[str, Any]
    verify: Any | None = None  # a tether.export.verify.VerifyReport once verified
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": self.format,
            "path": str(self.path),
            "sidecar": str(self.sidecar_path),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
        }
        if self.verify is not None:
            out["verify"] = self.verify.to_dict()
        out.update(self.extra)
        return out


# --- spaces --------------------------------------------------------------------------------------
def _json_number(x: float) -> float | None:
    """JSON has no infinity; an unbounded side is written as null."""
    return None if not math.isfinite(x) else float(x)


def _bound(arr: np.ndarray) -> Any:
    flat = np.asarray(arr, dtype=np.float64).ravel()
    if flat.size and np.all(flat == flat[0]):
        return _json_number(float(flat[0]))  # one number stands for the whole (possibly huge) array
    return [_json_number(float(v)) for v in flat]


def space_spec(space: gym.Space[Any]) -> dict[str, Any]:
    """A compact JSON description of a space: bounds that are all equal become one number,
    unbounded sides are null."""
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": str(space.dtype),
            "low": _bound(space.low),
            "high": _bound(space.high),
        }
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_spec(s) for k, s in space.spaces.items()}}
    raise ExportError(
        f"cannot export a policy over a {type(space).__name__} space; use Box, Discrete or Dict spaces."
    )


def space_from_spec(spec: dict[str, Any]) -> gym.Space[Any]:
    """Rebuild a space from `space_spec`'s description (as found in a sidecar)."""
    try:
        kind = spec["type"]
        if kind == "Box":
            dtype = np.dtype(spec["dtype"])
            shape = tuple(int(s) for s in spec["shape"])

            def bound(value: Any, fill: float) -> np.ndarray:
                arr = np.array(
                    [fill if v is None else v for v in value]
                    if isinstance(value, list)
                    else (fill if value is None else value),
                    dtype=np.float64,
                )
                return np.broadcast_to(arr.reshape(shape) if arr.ndim else arr, shape).astype(dtype)

            return gym.spaces.Box(bound(spec["low"], -np.inf), bound(spec["high"], np.inf), shape, dtype)
        if kind == "Discrete":
            return gym.spaces.Discrete(int(spec["n"]), start=int(spec.get("start", 0)))
        if kind == "Dict":
            return gym.spaces.Dict({k: space_from_spec(v) for k, v in spec["spaces"].items()})
    except (KeyError, TypeError, ValueError):
        pass
    raise ExportError("the sidecar's space description is malformed; export the model again.")


def _input_dtype(space: gym.spaces.Box, in_dict: bool) -> np.dtype:
    # Box observations are fed to the policy as float32 (as `act()` does); Dict entries keep
    # integer dtypes (uint8 camera frames stay uint8 on the wire) and floats become float32.
    if not in_dict or np.issubdtype(space.dtype, np.floating):
        return np.dtype(np.float32)
    return np.dtype(space.dtype)


def _observation_inputs(space: gym.Space[Any]) -> list[tuple[str, Any, np.dtype]]:
    if isinstance(space, gym.spaces.Box):
        return [("obs", space, _input_dtype(space, False))]
    if isinstance(space, gym.spaces.Discrete):
        # A discrete state (a grid cell, a menu screen) is one int64 index per row.
        return [("obs", space, np.dtype(np.int64))]
    if isinstance(space, gym.spaces.Dict):
        out = []
        for key, sub in space.spaces.items():
            if not isinstance(sub, gym.spaces.Box):
                raise ExportError(
                    f"observation key '{key}' is a {type(sub).__name__}; exports take Box entries only."
                )
            out.append((key, sub, _input_dtype(sub, True)))
        return out
    raise ExportError(
        f"cannot export a policy over a {type(space).__name__} observation space; "
        "use Box, Discrete or a Dict of Box."
    )


def sample_observations(space: gym.Space[Any], n: int, seed: int = 0) -> np.ndarray | dict[str, np.ndarray]:
    """`n` random observations from `space` as input arrays (a dict for Dict spaces)."""
    inputs = _observation_inputs(space)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, box, dtype in inputs:
        sub = copy.deepcopy(box)
        sub.seed(int(rng.integers(2**31)))
        out[name] = np.stack([sub.sample() for _ in range(n)]).astype(dtype)
    return out if isinstance(space, gym.spaces.Dict) else out["obs"]


def as_input_dict(obs: Any, input_names: list[str]) -> dict[str, np.ndarray]:
    """Observations (an array or a dict of arrays) keyed by model input name."""
    if isinstance(obs, dict):
        return {n: np.asarray(obs[n]) for n in input_names}
    return {input_names[0]: np.asarray(obs)}


def batch_size(obs: Any) -> int:
    return int(next(iter(obs.values())).shape[0]) if isinstance(obs, dict) else int(np.asarray(obs).shape[0])


def take_rows(obs: Any, idx: Any) -> Any:
    return {k: np.asarray(v)[idx] for k, v in obs.items()} if isinstance(obs, dict) else np.asarray(obs)[idx]


# --- the graph -----------------------------------------------------------------------------------
class PolicyGraph(nn.Module):
    """`policy` with positional tensor inputs (one per observation key) and fixed outputs:
    `action`, plus `q_values` when the policy returns Q-values for a Discrete action space."""

    def __init__(self, policy: nn.Module, keys: list[str] | None, discrete: bool, q_values: bool) -> None:
        super().__init__()
        self.policy, self.keys, self.discrete, self.q_values = policy, keys, discrete, q_values

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        obs: Any = dict(zip(self.keys, inputs, strict=True)) if self.keys else inputs[0]
        out = self.policy(obs)
        if self.q_values:
            return out.argmax(-1), _as_dtype(out, torch.float32)
        return _as_dtype(out, torch.int64 if self.discrete else torch.float32)


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `.float()` on a float32 tensor still traces to a Cast node that ONNX Runtime keeps and
    # runs (about 0.25 µs of a 8 µs batch-1 call); the dtype is static while tracing.
    return t if t.dtype == dtype else t.to(dtype)


def build_graph(
    policy: nn.Module, observation_space: gym.Space[Any], action_space: gym.Space[Any]
) -> tuple[PolicyGraph, list[TensorSpec], list[TensorSpec]]:
    """Wrap `policy` for export and describe its inputs and outputs."""
    inputs = _observation_inputs(observation_space)
    if not isinstance(action_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise ExportError(
            f"cannot export a policy with a {type(action_space).__name__} action space; use Box or Discrete."
        )
    discrete = isinstance(action_space, gym.spaces.Discrete)
    policy = policy.eval()
    sample = _tensors(sample_observations(observation_space, 2, seed=0), [n for n, _, _ in inputs])
    keys = [n for n, _, _ in inputs] if isinstance(observation_space, gym.spaces.Dict) else None
    with torch.no_grad():
        probe = policy(dict(zip(keys, sample, strict=True)) if keys else sample[0])
    if not isinstance(probe, torch.Tensor):
        raise ExportError(
            f"policy() returned a {type(probe).__name__}; an exportable policy returns one tensor."
        )
    # A discrete policy that returns one float per action is a Q-network: export argmax and the Q-values.
    n_actions = int(action_space.n) if isinstance(action_space, gym.spaces.Discrete) else 0
    q_values = discrete and probe.is_floating_point() and probe.dim() == 2 and probe.shape[-1] == n_actions
    graph = PolicyGraph(policy, keys, discrete, q_values).eval()
    in_specs = [TensorSpec(n, str(dt), [None, *box.shape]) for n, box, dt in inputs]
    if discrete:
        out_specs = [TensorSpec("action", "int64", [None])]
        if q_values:
            out_specs.append(TensorSpec("q_values", "float32", [None, n_actions]))
    else:
        out_specs = [TensorSpec("action", "float32", [None, *(action_space.shape or ())])]
    return graph, in_specs, out_specs


def _tensors(obs: Any, names: list[str]) -> list[torch.Tensor]:
    arrays = as_input_dict(obs, names)
    return [torch.from_numpy(np.ascontiguousarray(arrays[n])) for n in names]


def torch_outputs(graph: PolicyGraph, obs: Any, names: list[str]) -> list[np.ndarray]:
    """The PyTorch reference outputs of the export graph on input arrays."""
    with torch.no_grad():
        out = graph(*_tensors(obs, names))
    outs = out if isinstance(out, tuple) else (out,)
    return [o.cpu().numpy() for o in outs]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters narrate to stdout, warn and log at length; keep that out of our output."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "root")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _run_exporter(
    graph: PolicyGraph,
    args: tuple[torch.Tensor, ...],
    target: Path,
    in_specs: list[TensorSpec],
    out_specs: list[TensorSpec],
    opset: int,
    dynamo: bool,
) -> None:
    names_in = [s.name for s in in_specs]
    names_out = [s.name for s in out_specs]
    axes = {n: {0: "batch"} for n in names_in + names_out}
    kwargs: dict[str, Any] = {
        "input_names": names_in,
        "output_names": names_out,
        "opset_version": opset,
        "dynamo": dynamo,
    }
    if dynamo:
        # `forward(*inputs)`: one entry for the varargs tuple, one batch dim shared by every input.
        batch = torch.export.Dim("batch")
        kwargs.update(
            dynamic_shapes=(tuple({0: batch} for _ in names_in),),
            external_data=False,
            verbose=False,
            optimize=True,
        )
    else:
        kwargs["dynamic_axes"] = axes
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(graph, args, str(target), **kwargs)


def _drop_no_op_casts(data: bytes) -> bytes:
    """The model without Cast nodes whose input already has the target type (a policy's own
    `obs.float()` on a float32 input traces to one); ONNX Runtime's optimiser keeps them and
    runs each one, about 0.25 µs of a 8 µs batch-1 call. Graph outputs are left as they are."""
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(a.type in subgraphs for n in graph.node for a in n.attribute):
        return data  # names used inside If/Loop bodies are not rewritten here
    try:
        typed = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # an unusual graph just keeps its casts
        return data
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.input, *typed.value_info, *typed.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or node.output[0] in outputs:
            continue
        source = renamed.get(node.input[0], node.input[0])
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if to is None or types.get(source) != to:
            continue
        renamed[node.output[0]] = source
        graph.node.remove(node)
    if not renamed:
        return data
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError:
        return data
    return model.SerializeToString()


def _model_opset(data: bytes) -> int:
    import onnx

    model = onnx.load_from_string(data)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def export_onnx(
    policy: nn.Module,
    observation_space: gym.Space[Any],
    action_space: gym.Space[Any],
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    metadata: dict[str, Any] | None = None,
) -> ExportResult:
    """Export a deterministic policy module to one ONNX file plus its sidecar.

    `exporter`: `torchscript` (fast, any opset from 11; deprecated in torch), `dynamo` (torch's
    current exporter, opset 18 and later) or `auto` (TorchScript, falling back to dynamo).
    `metadata` goes into the sidecar (algorithm, checkpoint, training metrics, ...).
    """
    import onnx

    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise ExportError(f"opset {opset} is not supported; choose an opset from {MIN_OPSET} to {max_opset}.")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ExportError(f"unknown exporter '{exporter}'; choose auto, dynamo or torchscript.")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportError(
            f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or later; "
            "use --opset 18 or the torchscript exporter."
        )
    graph, in_specs, out_specs = build_graph(policy, observation_space, action_space)
    args = tuple(_tensors(sample_observations(observation_space, 2, seed=1), [s.name for s in in_specs]))
    plan = {"auto": ["torchscript", "dynamo"]}.get(exporter, [exporter])
    data, used, errors = b"", "", []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tether-onnx-") as tmp:
        target = Path(tmp) / "model.onnx"
        for name in plan:
            try:
                _run_exporter(graph, args, target, in_specs, out_specs, opset, dynamo=name == "dynamo")
                data = target.read_bytes()
            except Exception as exc:
                errors.append(
                    f"{name}: {exc.__class__.__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
                )
                log.info(
                    "the %s exporter failed (%s)%s",
                    name,
                    errors[-1],
                    "; trying the next one" if name != plan[-1] else "",
                )
                continue
            if _model_opset(data) != opset:
                errors.append(f"{name}: wrote opset {_model_opset(data)} instead of {opset}")
                data = b""
                continue
            used = name
            data = _drop_no_op_casts(data)
            break
    if not data:
        raise ExportError(
            f"the policy could not be exported to ONNX opset {opset} ({'; '.join(errors)}); "
            "try another --opset."
        )
    atomic_write_bytes(path, data)
    log.info("exported %s with the %s exporter in %.1f s", path.name, used, time.perf_counter() - start)
    extra = {"exporter": used, "opset": opset}
    sidecar = write_sidecar(
        path,
        "onnx",
        in_specs,
        out_specs,
        observation_space,
        action_space,
        normalizer=normalizer_stats(policy),
        metadata=metadata,
        extra=extra,
    )
    return ExportResult("onnx", path, sidecar_path(path), path.stat().st_size, sidecar["sha256"], sidecar)


# --- sidecar -------------------------------------------------------------------------------------
def normalizer_stats(policy: nn.Module) -> list[dict[str, Any]]:
    """Running observation statistics inside `policy` (any submodule with `mean` and `var`
    buffers), for the sidecar. They are already applied in the exported graph."""
    found = []
    for name, module in policy.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        if "mean" in buffers and "var" in buffers:
            entry: dict[str, Any] = {
                "module": name or "(root)",
                "formula": "clip((obs - mean) / sqrt(var + eps), -clip, clip)",
                "mean": np.asarray(buffers["mean"].detach().cpu(), dtype=np.float64).tolist(),
                "var": np.asarray(buffers["var"].detach().cpu(), dtype=np.float64).tolist(),
            }
            if "count" in buffers:
                entry["count"] = float(buffers["count"].item())
            for attr in ("clip", "eps"):
                value = getattr(module, attr, None)
                if isinstance(value, (int, float)):
                    entry[attr] = float(value)
            found.append(entry)
    return found


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return str(value)


def write_sidecar(
    model_path: Path,
    fmt: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    observation_space: gym.Space[Any] | dict[str, Any],
    action_space: gym.Space[Any] | dict[str, Any],
    *,
    normalizer: list[dict[str, Any]] | None = None,
    metadata: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `<model file>.json` next to a finished model file and return its content."""
    sidecar: dict[str, Any] = {
        **file_facts(model_path, fmt),
        "torch_version": torch.__version__.split("+")[0],
        "inputs": [s.to_dict() for s in inputs],
        "outputs": [s.to_dict() for s in outputs],
        "observation_space": space_spec(observation_space)
        if isinstance(observation_space, gym.Space)
        else observation_space,
        "action_space": space_spec(action_space) if isinstance(action_space, gym.Space) else action_space,
        "normalizer": normalizer or [],
    }
    add_metadata(sidecar, {**(extra or {}), **(metadata or {})})
    update_sidecar(model_path, sidecar)
    return sidecar


def file_facts(model_path: Path, fmt: str) -> dict[str, Any]:
    """What every sidecar says about its finished model file itself."""
    return {
        "format": SIDECAR_FORMAT,
        "sidecar_version": SIDECAR_VERSION,
        "model_format": fmt,
        "file": model_path.name,
        "size_bytes": model_path.stat().st_size,
        "sha256": sha256_file(model_path),
        "tether_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def add_metadata(sidecar: dict[str, Any], metadata: dict[str, Any] | None) -> None:
    """Add caller-supplied keys; they never overwrite the facts about the file itself."""
    for key, value in (metadata or {}).items():
        sidecar.setdefault(key, _json_safe(value))


def sidecar_result(model_path: Path, sidecar: dict[str, Any]) -> ExportResult:
    """Write `sidecar` next to `model_path` and describe the pair."""
    update_sidecar(model_path, sidecar)
    fmt = sidecar["model_format"]
    return ExportResult(
        fmt, model_path, sidecar_path(model_path), sidecar["size_bytes"], sidecar["sha256"], sidecar
    )


def update_sidecar(model_path: Path, sidecar: dict[str, Any]) -> None:
    atomic_write_text(
        sidecar_path(model_path), json.dumps(_json_safe(sidecar), indent=2, allow_nan=False) + "\n"
    )


def specs_from_sidecar(sidecar: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    ins = [TensorSpec(d["name"], d["dtype"], d["shape"]) for d in sidecar["inputs"]]
    outs = [TensorSpec(d["name"], d["dtype"], d["shape"]) for d in sidecar["outputs"]]
    return ins, outs


# --- one call for the CLI, the trainer and the service ------------------------------------------
FILE_SUFFIXES = {
    "onnx": ".onnx",
    "onnx-optimized": ".opt.onnx",
    "onnx-fp16": ".fp16.onnx",
    "onnx-int8": ".int8.onnx",
    "tflite": ".tflite",
    "rknn": ".rknn",
    "qtable-json": ".qtable.json",
}


def derive_sidecar(base: ExportResult, path: Path, fmt: str, extra: dict[str, Any]) -> ExportResult:
    """The sidecar of a file made from `base` (FP16, INT8, optimised): same specs, new checksum."""
    sidecar = {
        **base.sidecar,
        **file_facts(path, fmt),
        "derived_from": {"file": base.path.name, "sha256": base.sha256},
        **_json_safe(extra),
    }
    return sidecar_result(path, sidecar)


def export_learner(
    learner: Any,
    observation_space: gym.Space[Any],
    action_space: gym.Space[Any],
    out_dir: Path,
    fmt: str = "onnx",
    *,
    name: str = "policy",
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    verify: bool = False,
    optimize: bool = False,
    optimize_level: str = "basic",
    n_verify: int = 256,
    recorded: Any | None = None,
    calibration: dict[str, np.ndarray] | None = None,
    int8_mode: str | None = None,
    rknn_target: str = "rk3588",
    provider: str = "cpu",
    metadata: dict[str, Any] | None = None,
) -> list[ExportResult]:
    """Export `learner.policy()` (or a policy module) in `fmt`, with every file it needs.

    ONNX-derived formats also leave the FP32 `<name>.onnx` they were made from. FP16, INT8,
    TFLite and RKNN files are always compared with PyTorch (their accuracy goes into the
    sidecar); `verify` also checks the FP32 and optimised files and measures latency.
    `recorded` observations (array or dict, from the job's env or a file) join the random ones
    in verification; `calibration` (input name → array) drives static INT8 and INT8 RKNN.
    """
    from tether.export import verify as verify_mod

    if fmt not in FORMATS:
        raise ExportError(f"unsupported export format '{fmt}'; choose one of: {', '.join(FORMATS)}.")
    if int8_mode not in (None, "dynamic", "static"):
        raise ExportError(f"unknown INT8 mode '{int8_mode}'; choose dynamic or static.")
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ExportError(f"export name '{name}' must be a plain file name without slashes.")
    if fmt == "qtable-json":  # a table, not a graph: none of the steps below apply
        from tether.export.qtable import export_qtable_json

        return [export_qtable_json(learner, out_dir / f"{name}{FILE_SUFFIXES[fmt]}", metadata)]
    # Find the converter environments before spending time on anything else.
    if fmt == "tflite":
        from tether.export.tflite import find_tflite_python

        find_tflite_python()
    elif fmt == "rknn":
        from tether.export.rknn import RKNN_TARGETS, find_rknn_python

        if rknn_target not in RKNN_TARGETS:
            choices = ", ".join(RKNN_TARGETS)
            raise ExportError(f"unknown RKNN target '{rknn_target}'; choose one of: {choices}.")
        find_rknn_python()
    policy = learner if isinstance(learner, nn.Module) else learner.policy()
    policy = policy.eval()
    graph, in_specs, out_specs = build_graph(policy, observation_space, action_space)
    inputs, n_random, n_recorded = verify_mod.verification_inputs(
        observation_space, in_specs, n_verify, recorded
    )
    names = [s.name for s in in_specs]
    reference = torch_outputs(graph, inputs, names)
    out_dir.mkdir(parents=True, exist_ok=True)

    def path_for(kind: str) -> Path:
        return out_dir / f"{name}{FILE_SUFFIXES[kind]}"

    def check(result: ExportResult, kind: str, latency: bool = True) -> ExportResult:
        report = verify_mod.verify_model(
            result.path,
            kind,
            graph,
            observation_space,
            in_specs,
            out_specs,
            n=n_verify,
            recorded=recorded,
            provider=provider,
            latency=latency,
        )
        result.verify = report
        result.sidecar["accuracy"] = report.accuracy()
        update_sidecar(result.path, result.sidecar)
        return result

    results: list[ExportResult] = []
    if fmt == "tflite":
        from tether.export.tflite import export_tflite

        result, outputs = export_tflite(
            policy,
            observation_space,
            action_space,
            path_for("tflite"),
            verify_inputs=inputs,
            metadata=metadata,
        )
        result.verify = verify_mod.compare_outputs(
            "tflite", result.path.name, "litert", out_specs, reference, outputs, n_random, n_recorded
        )
        result.sidecar["accuracy"] = result.verify.accuracy()
        update_sidecar(result.path, result.sidecar)
        return [result]

    base = export_onnx(
        policy,
        observation_space,
        action_space,
        path_for("onnx"),
        opset=opset,
        exporter=exporter,
        metadata=metadata,
    )
    results.append(check(base, "onnx") if verify else base)
    if optimize:
        info = verify_mod.optimize_onnx(base.path, path_for("onnx-optimized"), optimize_level)
        opt = derive_sidecar(base, path_for("onnx-optimized"), "onnx", {"optimized": info})
        results.append(check(opt, "onnx-optimized") if verify else opt)
    if fmt == "onnx-fp16":
        from tether.export.quantize import convert_fp16

        convert_fp16(base.path, path_for("onnx-fp16"))
        half = derive_sidecar(
            base,
            path_for("onnx-fp16"),
            "onnx-fp16",
            {
                "precision": "float16 weights and matrix products; "
                "float32 inputs, outputs, normaliser and clipping",
            },
        )
        results.append(check(half, "onnx-fp16", latency=verify))
    elif fmt == "onnx-int8":
        from tether.export.quantize import quantize_int8_dynamic, quantize_int8_static

        mode = int8_mode or ("static" if calibration is not None else "dynamic")
        if mode == "static":
            calib = (
                calibration
                if calibration is not None
                else (as_input_dict(recorded, names) if recorded is not None else None)
            )
            if calib is None:
                raise ExportError(
                    "static INT8 needs recorded observations; pass --calibration FILE.npz "
                    "or export from a run whose environment can be built here."
                )
            info = quantize_int8_static(base.path, path_for("onnx-int8"), calib)
        else:
            info = quantize_int8_dynamic(base.path, path_for("onnx-int8"))
        q = derive_sidecar(base, path_for("onnx-int8"), "onnx-int8", {"quantization": info})
        results.append(check(q, "onnx-int8", latency=verify))
    elif fmt == "rknn":
        from tether.export.rknn import export_rknn

        result, outputs = export_rknn(
            base.path,
            path_for("rknn"),
            verify_inputs=inputs,
            target=rknn_target,
            calibration=calibration,
            metadata=metadata,
        )
        result.verify = verify_mod.compare_outputs(
            "rknn", result.path.name, "rknn-simulator", out_specs, reference, outputs, n_random, n_recorded
        )
        result.sidecar["accuracy"] = result.verify.accuracy()
        update_sidecar(result.path, result.sidecar)
        results.append(result)
    return results


# --- checkpoints ---------------------------------------------------------------------------------
EXPORTABLE_ALGORITHMS = ("ppo", "dqn", "sac")


def load_export_source(run_or_checkpoint: Path, table: bool = False) -> Any:
    """Load a run directory or checkpoint for export (`tether.runs.LoadedRun`), refusing with one
    sentence a checkpoint that is not ours, of an unknown algorithm, of one without a neural
    policy (or, with `table`, of one that is not a Q-table), or whose weights do not fit the
    learner its own config builds."""
    from tether.algos import ALGORITHMS
    from tether.checkpoint import load_checkpoint
    from tether.runs import load_learner, resolve_checkpoint

    ckpt = resolve_checkpoint(Path(run_or_checkpoint))
    state = load_checkpoint(ckpt)
    if state.get("format") != "tether-checkpoint":
        raise ExportError(
            f"{ckpt} is not a Tether training checkpoint; pass a run directory or a .pt it wrote."
        )
    algorithm = state.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise ExportError(
            f"checkpoint {ckpt.name} was written by an unknown algorithm {algorithm!r}; "
            f"tether export handles {', '.join(EXPORTABLE_ALGORITHMS)}."
        )
    if table and algorithm != "qtable":
        raise ExportError(
            f"--format qtable-json exports tabular Q-learning runs; checkpoint {ckpt.name} holds a "
            f"{algorithm} learner: export it as onnx."
        )
    if not table and algorithm not in EXPORTABLE_ALGORITHMS:
        hint = "; export its table with --format qtable-json" if algorithm == "qtable" else ""
        raise ExportError(
            f"checkpoint {ckpt.name} holds a {algorithm} learner, which has no neural policy to export; "
            f"tether export handles {', '.join(EXPORTABLE_ALGORITHMS)}{hint}."
        )
    configured = (state.get("config") or {}).get("training", {}).get("algorithm", "ppo")
    if configured != algorithm:
        raise ExportError(
            f"checkpoint {ckpt.name} says it holds a {algorithm} learner but its config trains {configured}; "
            "it was altered or written by another tool."
        )
    try:
        return load_learner(ckpt)
    except ExportError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise ExportError(
            f"checkpoint {ckpt.name}'s weights do not fit the {algorithm} learner its config builds "
            f"({exc.__class__.__name__}); it was written by another algorithm or Tether version."
        ) from None


def source_metadata(loaded: Any) -> dict[str, Any]:
    """What a sidecar records about where a policy came from."""
    ckpt: Path = loaded.checkpoint
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    meta = loaded.meta or {}
    return {
        "algorithm": meta.get("algorithm", loaded.config.algorithm),
        "source": {
            "checkpoint": ckpt.name,
            "run": run_dir.name,
            "job": loaded.config.name,
            "environment": loaded.config.environment.id,
        },
        "training": {"counters": meta.get("trainer", {}), "metrics": meta.get("metrics", {})},
    }
