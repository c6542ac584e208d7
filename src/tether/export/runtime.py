"""One small inference API over ONNX Runtime execution providers, TFLite (with an Edge TPU
delegate when present) and RKNN-Lite, for the device side of an exported policy.

This module imports neither torch nor anything else from training, so a rover or a game server
can run `load_runtime("policy.onnx").run(obs)` with only numpy and onnxruntime installed.

Providers: `auto` takes the first accelerator ONNX Runtime offers (CUDA, DirectML, CoreML,
OpenVINO) and CPU otherwise; `npu` means DirectML, then CoreML, OpenVINO, NNAPI, QNN; `coral`
means a TFLite Edge TPU delegate. An accelerator that was asked for and is absent falls back to
CPU with one log line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
import threading
from pathlib import Path
from typing import Any

import numpy as np

from tether.errors import TetherError, first_line

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "tether-export"
PROVIDER_CHOICES = ("auto", "cpu", "cuda", "directml", "coreml", "openvino", "coral", "npu")
MODEL_SUFFIXES = (".onnx", ".tflite", ".rknn")

# Our names → ONNX Runtime execution providers, in order of preference.
_ORT_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": (),
    "cuda": ("CUDAExecutionProvider",),
    "directml": ("DmlExecutionProvider",),
    "coreml": ("CoreMLExecutionProvider",),
    "openvino": ("OpenVINOExecutionProvider",),
    "npu": (
        "DmlExecutionProvider",
        "CoreMLExecutionProvider",
        "OpenVINOExecutionProvider",
        "NnapiExecutionProvider",
        "QNNExecutionProvider",
    ),
    "auto": (
        "CUDAExecutionProvider",
        "DmlExecutionProvider",
        "CoreMLExecutionProvider",
        "OpenVINOExecutionProvider",
    ),
    # The Edge TPU runs TFLite only; an ONNX file asked to run there falls back to CPU.
    "coral": (),
}

_EDGETPU_LIBRARY = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}


class ExportError(TetherError):
    """An export or an exported model cannot be used; the message says why and what to do."""


def provider_from_flags(provider: str = "auto", use_npu: bool = False, use_coral: bool = False) -> str:
    """Map the CLI's `--use-npu` / `--use-coral` shortcuts onto a provider name."""
    if use_npu and use_coral:
        raise ExportError("choose one of --use-npu and --use-coral, not both.")
    if use_npu:
        return "npu"
    if use_coral:
        return "coral"
    if provider not in PROVIDER_CHOICES:
        raise ExportError(f"unknown provider '{provider}'; choose one of: {', '.join(PROVIDER_CHOICES)}.")
    return provider


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(model_path: Path) -> Path:
    """`policy.onnx` → `policy.onnx.json`: one sidecar per model file, whatever its format."""
    return model_path.with_name(model_path.name + ".json")


def read_sidecar(model_path: Path) -> dict[str, Any] | None:
    """The JSON sidecar written next to an export, or None when there is none."""
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ExportError(
            f"sidecar {path} is not valid JSON; export the model again or delete the sidecar."
        ) from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise ExportError(f"sidecar {path} was not written by `tether export`; export the model again.")
    return data


def check_model_file(path: Path, sidecar: dict[str, Any] | None) -> None:
    """Refuse a missing or empty file, and one whose bytes differ from its sidecar's checksum."""
    if not path.is_file():
        raise ExportError(f"model file {path} does not exist; export one with `tether export`.")
    if path.stat().st_size == 0:
        raise ExportError(f"model file {path} is empty (an interrupted copy?); export it again.")
    expected = (sidecar or {}).get("sha256")
    if expected and sha256_file(path) != expected:
        raise ExportError(
            f"model file {path} does not match the checksum in its sidecar: it is truncated or corrupt; "
            "copy or export it again."
        )


def _as_batch(value: Any, dtype: np.dtype, rank: int) -> tuple[np.ndarray, bool]:
    """The array to feed and whether a batch axis was added (a single observation was given)."""
    arr = np.asarray(value)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    if arr.ndim == rank - 1:
        return arr[None], True
    if arr.ndim != rank:
        raise ExportError(
            f"observation has {arr.ndim} dimensions; "
            f"the model takes {rank - 1} (one observation) or {rank} (a batch)."
        )
    return np.ascontiguousarray(arr), False


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


class _BoundCall:
    """The single-observation fast path: `run(obs)` copies `obs` into the bound input row and
    runs the session on the bound buffers; `take()` then copies out the first output's row (an
    array, or a numpy scalar for a per-row scalar such as a discrete action), with no indexing
    per call. The caller serialises calls: the buffers are shared."""

    __slots__ = ("buffers", "call", "obs", "shape", "take")

    def __init__(self, call: Any, obs: np.ndarray, buffers: list[np.ndarray]) -> None:
        self.call, self.obs, self.shape = call, obs, obs.shape
        self.buffers = buffers  # every bound output; the binding (held by `call`) points into them
        row = buffers[0][0, ...]  # a view even when the row is 0-d
        self.take = row.copy if row.ndim else functools.partial(row.__getitem__, ())

    def run(self, obs: np.ndarray) -> None:
        # Slice assignment casts like copyto(casting="unsafe") at a third of its cost.
        self.obs[...] = obs
        self.call()


def _run_options(ort: Any) -> Any:
    """RunOptions that say "no graph capture" outright: onnxruntime's Python wrapper looks the
    `gpu_graph_id` entry up on every call, and an absent entry costs it a raised and caught
    exception (about 30 µs, four times the whole batch-1 run)."""
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", "-1")
    return options


class OnnxRuntimePolicy:
    """An exported ONNX policy in an ONNX Runtime session."""

    def __init__(self, path: Path, provider: str, threads: int, sidecar: dict[str, Any] | None) -> None:
        import onnxruntime as ort

        self.path, self.metadata = path, sidecar
        available = ort.get_available_providers()
        wanted = _ORT_PROVIDERS[provider]
        chosen = [p for p in wanted if p in available]
        if provider not in ("auto", "cpu") and not chosen:
            log.warning(
                "provider %s is not available here (have %s); running %s on CPU",
                provider,
                available,
                path.name,
            )
        options = ort.SessionOptions()
        # Tiny policies lose to thread hand-off: one thread is the fastest at batch 1.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=[*chosen[:1], "CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ExportError(
                f"{path} is not a readable ONNX model ({first_line(exc)}): "
                "it is truncated or corrupt; export it again."
            ) from None
        self.provider = self.session.get_providers()[0]
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._dtypes = [np.dtype(_ORT_DTYPES.get(i.type, np.float32)) for i in inputs]
        self._ranks = [len(i.shape) for i in inputs]
        self._first_output = self.output_names[:1]
        # Made once: with run_options=None the binding builds a default RunOptions on every
        # call, about 0.8 µs of a 8 µs batch-1 run.
        self._run_options = _run_options(ort)
        self._single = self._bind_single(ort, inputs)
        self._single_lock = threading.Lock()  # the bound buffers serve one call at a time

    def _bind_single(self, ort: Any, inputs: list[Any]) -> _BoundCall | None:
        """Buffers bound once for the device loop (one observation per call): a call copies the
        observation in and runs, with no per-call allocation or name lookup. CPU only, single
        input, fixed shapes apart from the batch axis."""
        if self.session.get_providers()[0] != "CPUExecutionProvider" or len(inputs) != 1:
            return None
        outputs = self.session.get_outputs()
        shapes = [i.shape[1:] for i in inputs] + [o.shape[1:] for o in outputs]
        if not all(isinstance(d, int) and d > 0 for shape in shapes for d in shape):
            return None
        out_dtypes = [np.dtype(_ORT_DTYPES.get(o.type, np.float32)) for o in outputs]
        if any(i.shape[0] not in (None, 1) and not isinstance(i.shape[0], str) for i in [*inputs, *outputs]):
            return None
        bound_in = np.zeros((1, *inputs[0].shape[1:]), self._dtypes[0])
        bound_out = [np.zeros((1, *o.shape[1:]), dt) for o, dt in zip(outputs, out_dtypes, strict=True)]
        # Bound CPU buffers need no device synchronisation after the run.
        run_options = _run_options(ort)
        run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        binding = self.session.io_binding()
        binding.bind_input(
            inputs[0].name, "cpu", 0, bound_in.dtype, list(bound_in.shape), bound_in.ctypes.data
        )
        for o, buf in zip(outputs, bound_out, strict=True):
            binding.bind_output(o.name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        # Every output stays bound (ONNX Runtime needs a place for each); `run` reads the first.
        call = functools.partial(self.session.run_with_iobinding, binding, run_options)
        return _BoundCall(call, bound_in[0, ...], bound_out)

    def _feed(self, obs: Any) -> tuple[dict[str, np.ndarray], bool]:
        if isinstance(obs, dict):
            missing = [n for n in self.input_names if n not in obs]
            if missing:
                raise ExportError(
                    f"observation lacks the model input(s) {missing}; the model takes {self.input_names}."
                )
            feed, single = {}, False
            for name, dtype, rank in zip(self.input_names, self._dtypes, self._ranks, strict=True):
                feed[name], single = _as_batch(obs[name], dtype, rank)
            return feed, single
        if len(self.input_names) != 1:
            raise ExportError(f"the model takes a dict observation with keys {self.input_names}.")
        arr, single = _as_batch(obs, self._dtypes[0], self._ranks[0])
        return {self.input_names[0]: arr}, single

    def run(self, obs: Any) -> np.ndarray:
        """The first output (the action) for one observation or a batch."""
        bound = self._single
        if bound is not None and isinstance(obs, np.ndarray):
            if obs.shape == bound.shape:
                with self._single_lock:
                    bound.run(obs)
                    return bound.take()
            if obs.ndim == self._ranks[0] - 1:
                raise ExportError(f"observation has shape {obs.shape}; the model takes {bound.shape}.")
        feed, single = self._feed(obs)
        out = self.session.run(self._first_output, feed, self._run_options)[0]
        return out[0] if single else out

    def run_all(self, obs: Any) -> dict[str, np.ndarray]:
        """Every output by name for one observation or a batch."""
        bound = self._single
        if bound is not None and isinstance(obs, np.ndarray) and obs.shape == bound.shape:
            with self._single_lock:
                bound.run(obs)
                return {n: b[0].copy() for n, b in zip(self.output_names, bound.buffers, strict=True)}
        feed, single = self._feed(obs)
        outs = self.session.run(self.output_names, feed, self._run_options)
        return {n: (o[0] if single else o) for n, o in zip(self.output_names, outs, strict=True)}


class TFLitePolicy:
    """An exported TFLite policy in the LiteRT (or tflite-runtime) interpreter."""

    def __init__(self, path: Path, provider: str, threads: int, sidecar: dict[str, Any] | None) -> None:
        self.path, self.metadata = path, sidecar
        interpreter_cls, load_delegate = _tflite_interpreter()
        delegates = []
        self.provider = "tflite-cpu"
        if provider in ("coral", "npu", "auto"):
            lib = _EDGETPU_LIBRARY.get(platform.system(), "libedgetpu.so.1")
            try:
                delegates = [load_delegate(lib)]
                self.provider = "edgetpu"
            except (OSError, ValueError, RuntimeError):
                if provider != "auto":
                    log.warning("Edge TPU delegate %s is not available; running %s on CPU", lib, path.name)
        elif provider != "cpu":
            log.warning("provider %s does not run TFLite models; running %s on CPU", provider, path.name)
        try:
            self.interpreter = interpreter_cls(
                model_path=str(path), experimental_delegates=delegates or None, num_threads=threads
            )
            self.interpreter.allocate_tensors()
        except Exception as exc:
            raise ExportError(
                f"{path} is not a readable TFLite model ({first_line(exc)}): "
                "it is truncated or corrupt; export it again."
            ) from None
        # litert-torch names signature inputs args_0, args_1, ... and outputs output_0, ... in the
        # policy's order; the sidecar gives them their real names.
        signatures = self.interpreter.get_signature_list()
        key = next(iter(signatures))
        self._runner = self.interpreter.get_signature_runner(key)
        self._in_keys = sorted(signatures[key]["inputs"], key=_numbered)
        self._out_keys = sorted(signatures[key]["outputs"], key=_numbered)
        details = self._runner.get_input_details()
        self._in_dtypes = [np.dtype(details[k]["dtype"]) for k in self._in_keys]
        self._in_ranks = [len(details[k]["shape"]) for k in self._in_keys]
        spec_in = [i["name"] for i in (sidecar or {}).get("inputs", [])]
        spec_out = [o["name"] for o in (sidecar or {}).get("outputs", [])]
        self.input_names = spec_in if len(spec_in) == len(self._in_keys) else list(self._in_keys)
        self.output_names = spec_out if len(spec_out) == len(self._out_keys) else list(self._out_keys)

    def run_all(self, obs: Any) -> dict[str, np.ndarray]:
        # The TFLite export has a fixed batch of one; a batch runs row by row.
        if isinstance(obs, dict):
            missing = [n for n in self.input_names if n not in obs]
            if missing:
                raise ExportError(
                    f"observation lacks the model input(s) {missing}; the model takes {self.input_names}."
                )
            values = [obs[n] for n in self.input_names]
        else:
            values = [obs]
        batches = [
            _as_batch(v, dt, r) for v, dt, r in zip(values, self._in_dtypes, self._in_ranks, strict=True)
        ]
        single = batches[0][1]
        outs: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for i in range(batches[0][0].shape[0]):
            res = self._runner(**{k: b[0][i : i + 1] for k, b in zip(self._in_keys, batches, strict=True)})
            for name, key in zip(self.output_names, self._out_keys, strict=True):
                outs[name].append(res[key])
        stacked = {n: np.concatenate(v) for n, v in outs.items()}
        return {n: (o[0] if single else o) for n, o in stacked.items()}

    def run(self, obs: Any) -> np.ndarray:
        return self.run_all(obs)[self.output_names[0]]


def _numbered(key: str) -> int:
    tail = key.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class RknnPolicy:
    """An exported RKNN policy on a Rockchip NPU through RKNN-Toolkit-Lite2 (device side only)."""

    def __init__(self, path: Path, provider: str, sidecar: dict[str, Any] | None) -> None:
        try:
            from rknnlite.api import RKNNLite
        except ImportError:
            raise ExportError(
                "running .rknn models needs rknn-toolkit-lite2 on the Rockchip board "
                "(pip install rknn-toolkit-lite2); elsewhere load the .onnx export instead."
            ) from None
        self.path, self.metadata = path, sidecar
        if provider not in ("auto", "npu", "cpu"):
            log.warning("provider %s does not run RKNN models; using the Rockchip NPU", provider)
        self._rknn = RKNNLite(verbose=False)
        if self._rknn.load_rknn(str(path)) != 0 or self._rknn.init_runtime() != 0:
            raise ExportError(
                f"{path} could not be loaded on this NPU; export it again for this board's target."
            )
        self.provider = "rknn-npu"
        self.input_names = [i["name"] for i in (sidecar or {}).get("inputs", [])] or ["obs"]
        self.output_names = [o["name"] for o in (sidecar or {}).get("outputs", [])] or ["action"]

    def run_all(self, obs: Any) -> dict[str, np.ndarray]:
        values = [obs[n] for n in self.input_names] if isinstance(obs, dict) else [obs]
        arrays = [np.asarray(v, dtype=np.float32) for v in values]
        rank = len(((self.metadata or {}).get("inputs") or [{"shape": [None, 0]}])[0]["shape"])
        single = arrays[0].ndim == rank - 1
        arrays = [a[None] if single else a for a in arrays]
        # The RKNN export has a fixed batch of one.
        rows = [
            self._rknn.inference(inputs=[a[i : i + 1] for a in arrays]) for i in range(arrays[0].shape[0])
        ]
        outs = {n: np.concatenate([np.asarray(r[k]) for r in rows]) for k, n in enumerate(self.output_names)}
        return {n: (o[0] if single else o) for n, o in outs.items()}

    def run(self, obs: Any) -> np.ndarray:
        return self.run_all(obs)[self.output_names[0]]


Runtime = OnnxRuntimePolicy | TFLitePolicy | RknnPolicy


def _tflite_interpreter() -> tuple[Any, Any]:
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter, load_delegate
        except ImportError:
            raise ExportError(
                "running .tflite models needs the LiteRT interpreter; "
                "install it with `pip install ai-edge-litert` (or tflite-runtime on older boards)."
            ) from None
    return Interpreter, load_delegate


def load_runtime(
    path: str | Path, provider: str = "auto", threads: int = 1, verify_checksum: bool = True
) -> Runtime:
    """Load an exported policy (`.onnx`, `.tflite` or `.rknn`) for inference.

    The returned object has `run(obs) -> np.ndarray` (the action; a single observation gives a
    single action, a batch gives a batch), `run_all(obs)` (every output by name), `.provider`,
    `.input_names`, `.output_names` and `.metadata` (the sidecar, when there is one).
    """
    path = Path(path)
    if provider not in PROVIDER_CHOICES:
        raise ExportError(f"unknown provider '{provider}'; choose one of: {', '.join(PROVIDER_CHOICES)}.")
    if path.suffix not in MODEL_SUFFIXES:
        raise ExportError(f"{path.name} is not an exported model; load a {', '.join(MODEL_SUFFIXES)} file.")
    sidecar = read_sidecar(path)
    check_model_file(path, sidecar if verify_checksum else None)
    if threads < 1:
        raise ExportError("threads must be at least 1.")
    if path.suffix == ".onnx":
        runtime: Runtime = OnnxRuntimePolicy(path, provider, threads, sidecar)
    elif path.suffix == ".tflite":
        runtime = TFLitePolicy(path, provider, threads, sidecar)
    else:
        runtime = RknnPolicy(path, provider, sidecar)
    log.info("loaded %s on %s", path.name, runtime.provider)
    return runtime
