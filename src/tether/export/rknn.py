"""RKNN export for Rockchip NPUs (RK3588 and friends) through `rknn-toolkit2`.

`rknn-toolkit2` pins an old torch (≤ 2.4), numpy 1.x and onnx ≤ 1.18, so it lives in its own
environment and runs through a subprocess: Tether exports the FP32 ONNX model first, the worker
converts it (batch fixed at 1; FP16 by default, INT8 with a calibration set), then runs the
toolkit's simulator on the verification observations so the result can be compared with PyTorch.

The environment is found at `$TETHER_RKNN_PYTHON`, in the running interpreter when `rknn.api` is
importable there, or at `~/.cache/tether/rknn-venv/bin/python`. On the board, load the `.rknn`
file with `tether.export.runtime.load_runtime` (RKNN-Toolkit-Lite2) or keep using the `.onnx`
file with ONNX Runtime: the API is the same.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tether.checkpoint import atomic_write_bytes
from tether.export.external import find_python, run_worker
from tether.export.onnx import ExportResult, TensorSpec, as_input_dict, write_sidecar
from tether.export.runtime import ExportError, read_sidecar

RKNN_PYTHON_ENV = "TETHER_RKNN_PYTHON"
DEFAULT_RKNN_PYTHON = Path("~/.cache/tether/rknn-venv/bin/python")
RKNN_TARGETS = ("rk3588", "rk3576", "rk3568", "rk3566", "rk3562", "rv1103", "rv1106", "rk2118")
SETUP_HINT = (
    "create it with `python3 -m venv ~/.cache/tether/rknn-venv && ~/.cache/tether/rknn-venv/bin/pip install "
    f"rknn-toolkit2` or point {RKNN_PYTHON_ENV} at one"
)

# Runs inside the RKNN environment: only numpy and rknn-toolkit2.
WORKER = r"""
import json, sys, os, contextlib, io
def reply(**kw):
    sys.stdout.write("\nTETHER-RESULT " + json.dumps(kw) + "\n"); sys.stdout.flush(); sys.exit(0)
args = json.load(open(sys.argv[1]))
try:
    import numpy as np
    from rknn.api import RKNN
except ImportError as exc:
    reply(ok=False, kind="missing", detail=str(exc))
rknn = RKNN(verbose=False)
def step(name, ret):
    if ret != 0:
        reply(ok=False, kind="convert", detail=f"{name} returned {ret}")
step("config", rknn.config(target_platform=args["target"], optimization_level=3))
names, shapes = args["input_names"], args["input_shapes"]
step("load_onnx", rknn.load_onnx(model=args["onnx"], inputs=names, input_size_list=shapes))
step("build", rknn.build(do_quantization=args["quantize"], dataset=args.get("dataset")))
step("export_rknn", rknn.export_rknn(args["output"]))
data = np.load(args["inputs"], allow_pickle=False)
names = args["input_names"]
step("init_runtime", rknn.init_runtime())  # no target: the toolkit's simulator
outs = None
for i in range(data[names[0]].shape[0]):
    feed = [data[n][i : i + 1] for n in names]
    fmt = ["nchw" if x.ndim == 4 else "nhwc" for x in feed]
    res = rknn.inference(inputs=feed, data_format=fmt)
    if outs is None:
        outs = [[] for _ in res]
    for k, r in enumerate(res):
        outs[k].append(np.asarray(r).reshape(1, *np.asarray(r).shape[1:]))
np.savez(args["outputs"], *[np.concatenate(o) for o in outs])
rknn.release()
reply(ok=True, outputs=len(outs))
"""


def find_rknn_python() -> str:
    """The Python that can run rknn-toolkit2, or an ExportError that says how to make one."""
    return find_python(
        RKNN_PYTHON_ENV,
        DEFAULT_RKNN_PYTHON,
        "rknn",
        "RKNN export needs rknn-toolkit2 in its own environment (it pins an old torch and numpy)",
        SETUP_HINT,
    )


def export_rknn(
    onnx_path: Path,
    path: Path,
    *,
    verify_inputs: Any,
    target: str = "rk3588",
    calibration: dict[str, np.ndarray] | None = None,
    metadata: dict[str, Any] | None = None,
    python: str | None = None,
    timeout: float = 900.0,
) -> tuple[ExportResult, list[np.ndarray]]:
    """Convert a Tether FP32 ONNX export to `path` (.rknn, batch 1; INT8 when `calibration` is
    given, FP16 otherwise) and return the result with the simulator's outputs on `verify_inputs`."""
    if target not in RKNN_TARGETS:
        raise ExportError(f"unknown RKNN target '{target}'; choose one of: {', '.join(RKNN_TARGETS)}.")
    source = read_sidecar(onnx_path)
    if source is None:
        raise ExportError(f"{onnx_path} has no sidecar; export it with `tether export --format onnx` first.")
    python = python or find_rknn_python()
    in_specs = [TensorSpec(d["name"], d["dtype"], d["shape"]) for d in source["inputs"]]
    out_specs = [TensorSpec(d["name"], d["dtype"], d["shape"]) for d in source["outputs"]]
    names = [s.name for s in in_specs]
    inputs = as_input_dict(verify_inputs, names)
    with tempfile.TemporaryDirectory(prefix="tether-rknn-") as tmp:
        work = Path(tmp)
        np.savez(work / "inputs.npz", **{k: np.ascontiguousarray(v) for k, v in inputs.items()})  # type: ignore[arg-type]
        args: dict[str, Any] = {
            "onnx": str(onnx_path.resolve()),
            "output": str(work / "model.rknn"),
            "inputs": str(work / "inputs.npz"),
            "outputs": str(work / "outputs.npz"),
            "input_names": names,
            "input_shapes": [[1, *s.shape[1:]] for s in in_specs],
            "target": target,
            "quantize": calibration is not None,
        }
        if calibration is not None:
            args["dataset"] = _write_dataset(work, calibration, names)
        (work / "args.json").write_text(json.dumps(args), encoding="utf-8")
        (work / "worker.py").write_text(WORKER, encoding="utf-8")
        reply = run_worker("RKNN", python, work, timeout, SETUP_HINT)
        if not reply.get("ok"):
            if reply.get("kind") == "missing":
                raise ExportError(f"{python} has no rknn-toolkit2 ({reply.get('detail')}); {SETUP_HINT}.")
            raise ExportError(
                f"rknn-toolkit2 could not convert {onnx_path.name} ({reply.get('detail')}); "
                "check the toolkit's log."
            )
        atomic_write_bytes(path, (work / "model.rknn").read_bytes())
        with np.load(work / "outputs.npz", allow_pickle=False) as data:
            outputs = [np.asarray(data[f"arr_{i}"]) for i in range(int(reply["outputs"]))]
    if len(outputs) != len(out_specs):
        raise ExportError(f"the RKNN model has {len(outputs)} outputs; the policy has {len(out_specs)}.")
    outputs = [
        o.astype(np.dtype(s.dtype)).reshape(o.shape[0], *s.shape[1:])
        for o, s in zip(outputs, out_specs, strict=True)
    ]
    sidecar = write_sidecar(
        path,
        "rknn",
        [TensorSpec(s.name, s.dtype, [1, *s.shape[1:]]) for s in in_specs],
        [TensorSpec(s.name, s.dtype, [1, *s.shape[1:]]) for s in out_specs],
        source["observation_space"],
        source["action_space"],
        normalizer=source.get("normalizer"),
        metadata={k: source[k] for k in ("algorithm", "source", "training") if k in source},
        extra={
            **(metadata or {}),
            "target_platform": target,
            "dtype": "int8" if calibration is not None else "float16",
            "batch": "fixed at 1; run a batch row by row",
            "converted_from": {
                "file": onnx_path.name,
                "sha256": source.get("sha256"),
                "opset": source.get("opset"),
            },
        },
    )
    result = ExportResult(
        "rknn", path, path.with_name(path.name + ".json"), path.stat().st_size, sidecar["sha256"], sidecar
    )
    return result, outputs


def _write_dataset(work: Path, calibration: dict[str, np.ndarray], names: list[str]) -> str:
    """rknn-toolkit2's dataset: a text file, one line per sample, one .npy path per input."""
    rows = int(calibration[names[0]].shape[0])
    lines = []
    for i in range(min(rows, 512)):
        paths = []
        for k, name in enumerate(names):
            p = work / f"calib_{i}_{k}.npy"
            np.save(p, np.ascontiguousarray(calibration[name][i : i + 1]))
            paths.append(str(p))
        lines.append(" ".join(paths))
    dataset = work / "dataset.txt"
    dataset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(dataset)
