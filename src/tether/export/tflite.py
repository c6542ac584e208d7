"""TFLite export through `litert-torch`, run in its own Python environment.

`litert-torch` cannot share Tether's environment: it pins an older pydantic and typing-extensions
and brings jax, transformers and the LiteRT converter (about 2 GB). So the conversion runs in a
separate virtual environment through a subprocess. Tether hands it the policy as a
`torch.export` program (the same torch version on both sides: no pickles, no Tether import
there) plus the verification observations; the worker converts, runs the LiteRT interpreter on
those observations and hands the outputs back, and Tether compares them with PyTorch.

The environment is found, in order, at `$TETHER_TFLITE_PYTHON`, in the running interpreter when
`litert_torch` is importable there, or at `~/.cache/tether/tflite-venv/bin/python`. Set one up:

    python3 -m venv ~/.cache/tether/tflite-venv
    ~/.cache/tether/tflite-venv/bin/pip install torch==<Tether's torch version> litert-torch
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether.checkpoint import atomic_write_bytes
from tether.export.external import find_python, run_worker
from tether.export.onnx import (
    ExportResult,
    TensorSpec,
    as_input_dict,
    build_graph,
    normalizer_stats,
    write_sidecar,
)
from tether.export.runtime import ExportError

log = logging.getLogger(__name__)

TFLITE_PYTHON_ENV = "TETHER_TFLITE_PYTHON"
DEFAULT_TFLITE_PYTHON = Path("~/.cache/tether/tflite-venv/bin/python")
SETUP_HINT = (
    "create it with `python3 -m venv ~/.cache/tether/tflite-venv && "
    f"~/.cache/tether/tflite-venv/bin/pip install torch=={torch.__version__.split('+')[0]} litert-torch` "
    f"or point {TFLITE_PYTHON_ENV} at one"
)

# Runs inside the TFLite environment: only torch, numpy, litert_torch and the LiteRT interpreter.
WORKER = r"""
import json, sys, traceback
def reply(**kw):
    sys.stdout.write("\nTETHER-RESULT " + json.dumps(kw) + "\n"); sys.stdout.flush(); sys.exit(0)
args = json.load(open(sys.argv[1]))
try:
    import numpy as np, torch
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter
except ImportError as exc:
    reply(ok=False, kind="missing", detail=str(exc))
if torch.__version__.split("+")[0] != args["torch_version"]:
    reply(ok=False, kind="torch", detail=torch.__version__)
try:
    program = torch.export.load(args["program"])
    data = np.load(args["inputs"], allow_pickle=False)
    names = args["input_names"]
    sample = tuple(torch.from_numpy(data[n][:1]) for n in names)
    model = litert_torch.convert(program.module(), sample)
    model.export(args["output"])
except Exception as exc:
    detail = f"{exc.__class__.__name__}: {exc}"
    reply(ok=False, kind="convert", detail=detail, trace=traceback.format_exc()[-2000:])
interpreter = Interpreter(model_path=args["output"])
runner = interpreter.get_signature_runner()
signature = interpreter.get_signature_list()
key = next(iter(signature))
order = lambda k: int(k.rsplit("_", 1)[-1]) if k.rsplit("_", 1)[-1].isdigit() else 0
in_keys = sorted(signature[key]["inputs"], key=order)
out_keys = sorted(signature[key]["outputs"], key=order)
rows = data[names[0]].shape[0]
outs = {k: [] for k in out_keys}
for i in range(rows):
    res = runner(**{k: data[n][i : i + 1] for k, n in zip(in_keys, names)})
    for k in out_keys:
        outs[k].append(res[k])
np.savez(args["outputs"], **{k: np.concatenate(v) for k, v in outs.items()})
reply(ok=True, output_keys=out_keys, input_keys=in_keys)
"""


def find_tflite_python() -> str:
    """The Python that can run litert-torch, or an ExportError that says how to make one."""
    return find_python(
        TFLITE_PYTHON_ENV,
        DEFAULT_TFLITE_PYTHON,
        "litert_torch",
        "TFLite export needs litert-torch in its own environment",
        SETUP_HINT,
    )


def export_tflite(
    policy: torch.nn.Module,
    observation_space: Any,
    action_space: Any,
    path: Path,
    *,
    verify_inputs: Any,
    metadata: dict[str, Any] | None = None,
    python: str | None = None,
    timeout: float = 900.0,
) -> tuple[ExportResult, list[np.ndarray]]:
    """Convert the policy to `path` (.tflite, batch 1) and return the result with the LiteRT
    interpreter's outputs on `verify_inputs` (for `tether.export.verify.compare_outputs`)."""
    python = python or find_tflite_python()
    graph, in_specs, out_specs = build_graph(policy, observation_space, action_space)
    names = [s.name for s in in_specs]
    inputs = as_input_dict(verify_inputs, names)
    sample = tuple(torch.from_numpy(np.ascontiguousarray(inputs[n][:1])) for n in names)
    with tempfile.TemporaryDirectory(prefix="tether-tflite-") as tmp:
        work = Path(tmp)
        try:
            with torch.no_grad():
                program = torch.export.export(graph, sample)
        except Exception as exc:
            raise ExportError(
                f"the policy could not be traced for TFLite ({exc.__class__.__name__}); export ONNX instead."
            ) from None
        torch.export.save(program, str(work / "policy.pt2"))
        np.savez(work / "inputs.npz", **inputs)  # type: ignore[arg-type]
        (work / "worker.py").write_text(WORKER, encoding="utf-8")
        args = {
            "program": str(work / "policy.pt2"),
            "inputs": str(work / "inputs.npz"),
            "outputs": str(work / "outputs.npz"),
            "output": str(work / "model.tflite"),
            "input_names": names,
            "torch_version": torch.__version__.split("+")[0],
        }
        (work / "args.json").write_text(json.dumps(args), encoding="utf-8")
        reply = run_worker("TFLite", python, work, timeout, SETUP_HINT, {"TF_CPP_MIN_LOG_LEVEL": "2"})
        if not reply.get("ok"):
            kind = reply.get("kind")
            if kind == "missing":
                raise ExportError(f"{python} has no litert-torch ({reply.get('detail')}); {SETUP_HINT}.")
            if kind == "torch":
                raise ExportError(
                    f"{python} has torch {reply.get('detail')} but Tether runs torch "
                    f"{args['torch_version']}; install the same torch version in the TFLite environment."
                )
            log.debug("litert-torch failed:\n%s", reply.get("trace", ""))
            raise ExportError(
                f"litert-torch could not convert the policy ({reply.get('detail')}); export ONNX instead."
            )
        atomic_write_bytes(path, (work / "model.tflite").read_bytes())
        with np.load(work / "outputs.npz", allow_pickle=False) as data:
            # The worker lists litert-torch's output_0, output_1, ... in the policy's output order.
            outputs = [np.asarray(data[k]) for k in reply["output_keys"]]
    if len(outputs) != len(out_specs):
        raise ExportError(f"the TFLite model has {len(outputs)} outputs; the policy has {len(out_specs)}.")
    # TFLite has no 64-bit I/O by default: a discrete action comes back as int32.
    tfl_out = [
        TensorSpec(s.name, "int32" if s.dtype == "int64" else s.dtype, [1, *s.shape[1:]]) for s in out_specs
    ]
    tfl_in = [TensorSpec(s.name, s.dtype, [1, *s.shape[1:]]) for s in in_specs]
    sidecar = write_sidecar(
        path,
        "tflite",
        tfl_in,
        tfl_out,
        observation_space,
        action_space,
        normalizer=normalizer_stats(policy),
        metadata=metadata,
        extra={"batch": "fixed at 1; run a batch row by row", "converter": "litert-torch"},
    )
    result = ExportResult(
        "tflite", path, path.with_name(path.name + ".json"), path.stat().st_size, sidecar["sha256"], sidecar
    )
    return result, outputs
