"""FP16 conversion and INT8 quantization of an exported ONNX policy, and calibration data.

FP16 halves the file and suits GPUs and NPUs with half-precision units; inputs and outputs stay
float32 so device code does not change, and the observation normaliser, clipping and argmax stay
float32 because raw sensor values (hundreds of metres, thousands of ticks) lose whole units in
half precision. INT8 is dynamic (weights int8, activations quantized per call: no data needed)
or static (activation ranges calibrated on recorded observations, QDQ format). Only the matrix
products (MatMul, Gemm, Conv) are quantized; the cheap element-wise ops around them keep float
precision. How close each variant stays to PyTorch is measured by `tether.export.verify`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tether.checkpoint import atomic_write_bytes
from tether.export.runtime import ExportError

log = logging.getLogger(__name__)

# Ops that do the heavy lifting; everything before the first of them (the observation
# normaliser, scaling of camera frames) stays float32 in the FP16 model.
MATRIX_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
INT8_OP_TYPES = ("MatMul", "Gemm", "Conv")
MAX_CALIBRATION_BYTES = 1 << 30
MAX_CALIBRATION_ROWS = 100_000


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The quantization tools log advice at WARNING on the root logger for every call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _float16_converter() -> Any:
    try:
        from onnxconverter_common.float16 import convert_float_to_float16
    except ImportError:
        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16
        except ImportError:
            raise ExportError(
                "FP16 conversion needs onnxconverter-common or onnxruntime's transformers tools; "
                "install one with `pip install onnxconverter-common`."
            ) from None
    return convert_float_to_float16


def convert_fp16(src: Path, dst: Path) -> None:
    """Write an FP16 copy of the ONNX model `src` to `dst` (float32 inputs and outputs).

    Raw observations can be large (positions in metres, encoder ticks) where float16 keeps only
    whole units, so the input pre-processing (every node before the first matrix product: the
    normaliser, clipping, pixel scaling) stays float32, as do the converter's own blocked ops
    (Min/Max: the action clipping).
    """
    import onnx

    convert = _float16_converter()
    model = _load(src)
    _topological_sort(model.graph)
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"tether_node_{i}"
    with _quiet():
        half = convert(model, keep_io_types=True, node_block_list=_input_prefix(model.graph))
    _drop_duplicate_casts(half.graph)
    _topological_sort(half.graph)
    onnx.checker.check_model(half)
    atomic_write_bytes(dst, half.SerializeToString())


def _input_prefix(graph: Any) -> list[str]:
    """Names of the nodes computed from graph inputs and constants alone, before any matrix op."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    prefix = []
    for node in graph.node:
        if node.op_type in MATRIX_OPS or not all(i in available for i in node.input):
            continue
        prefix.append(node.name)
        available.update(node.output)
    return prefix


def _drop_duplicate_casts(graph: Any) -> None:
    """The converter inserts one Cast per blocked consumer of a tensor, all with the same output
    name; identical copies compute the same value, so one is kept. Anything else is a real clash."""
    seen: dict[str, bytes] = {}
    kept = []
    for node in graph.node:
        signature = node.op_type.encode() + b"|".join(
            [*(i.encode() for i in node.input), *(a.SerializeToString() for a in node.attribute)]
        )
        clash = [o for o in node.output if o in seen]
        if clash:
            if all(seen[o] == signature for o in node.output):
                continue
            raise ExportError(
                f"FP16 conversion produced two different values named {clash[0]}; use INT8 or FP32."
            )
        for o in node.output:
            seen[o] = signature
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _topological_sort(graph: Any) -> None:
    """Reorder nodes so each comes after its inputs' producers (the converter appends the casts
    it inserts around blocked ops at the end, which ONNX checkers reject)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("the FP16 graph has a cycle or a missing input; export the FP32 model again.")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def _load(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception:
        raise ExportError(
            f"{path} is not a readable ONNX model: it is truncated or corrupt; export it again."
        ) from None


def _preprocess(src: Path, dst: Path) -> None:
    """Shape inference and graph clean-up; the dynamo exporter's models need it before quantization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception as exc:
        log.info("quantization pre-processing failed (%s); quantizing the model as exported", exc)
        dst.write_bytes(src.read_bytes())


def quantize_int8_dynamic(src: Path, dst: Path, per_channel: bool = False) -> dict[str, Any]:
    """Dynamic INT8: int8 weights, activations quantized on the fly. Returns the settings used."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _load(src)
    with tempfile.TemporaryDirectory(prefix="tether-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        _preprocess(src, pre)
        try:
            with _quiet():
                quantize_dynamic(
                    str(pre),
                    str(out),
                    weight_type=QuantType.QInt8,
                    per_channel=per_channel,
                    op_types_to_quantize=list(INT8_OP_TYPES),
                )
        except Exception as exc:
            raise ExportError(
                f"dynamic INT8 quantization of {src.name} failed ({exc.__class__.__name__}: {exc})."
            ) from None
        atomic_write_bytes(dst, out.read_bytes())
    return {
        "mode": "dynamic",
        "weight_type": "int8",
        "per_channel": per_channel,
        "op_types": list(INT8_OP_TYPES),
    }


class ObservationReader:
    """A `CalibrationDataReader` over recorded observations, `batch` rows at a time."""

    def __init__(self, inputs: dict[str, np.ndarray], batch: int = 64) -> None:
        self.inputs = inputs
        self.batch = batch
        self.rows = int(next(iter(inputs.values())).shape[0])
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self.rows:
            return None
        stop = min(self._pos + self.batch, self.rows)
        feed = {k: np.ascontiguousarray(v[self._pos : stop]) for k, v in self.inputs.items()}
        self._pos = stop
        return feed

    def rewind(self) -> None:
        self._pos = 0


def quantize_int8_static(
    src: Path, dst: Path, calibration: dict[str, np.ndarray], per_channel: bool = True
) -> dict[str, Any]:
    """Static INT8 (QDQ): activation ranges from `calibration` (input name → (N, ...) arrays)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    _load(src)
    rows = int(next(iter(calibration.values())).shape[0]) if calibration else 0
    if rows < 1:
        raise ExportError("static INT8 quantization needs at least one calibration observation.")

    class _Reader(ObservationReader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="tether-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        _preprocess(src, pre)
        try:
            with _quiet():
                quantize_static(
                    str(pre),
                    str(out),
                    _Reader(calibration),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=per_channel,
                    op_types_to_quantize=list(INT8_OP_TYPES),
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                    calibration_cache_path=None,
                )
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(
                f"static INT8 quantization of {src.name} failed ({exc.__class__.__name__}: {exc})."
            ) from None
        atomic_write_bytes(dst, out.read_bytes())
    return {
        "mode": "static",
        "format": "QDQ",
        "weight_type": "int8",
        "activation_type": "int8",
        "per_channel": per_channel,
        "calibration_method": "minmax",
        "calibration_samples": rows,
        "op_types": list(INT8_OP_TYPES),
    }


# --- calibration files ---------------------------------------------------------------------------
def _member_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def load_calibration(path: Path, inputs: list[Any]) -> dict[str, np.ndarray]:
    """Recorded observations from an `.npz` file, keyed by model input.

    `inputs` are the model's input specs (`name`, `dtype`, `shape`). A single-input model takes
    the array named like the input (`obs`) or the file's only array; a Dict-observation model
    needs one array per key. Arrays are (N, *observation shape), finite, at most 100,000 rows and
    1 GiB; object arrays (pickles) are refused.
    """
    if not path.is_file():
        raise ExportError(f"calibration file {path} does not exist; record observations into an .npz first.")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise ExportError(
            f"calibration file {path} is not an .npz archive (truncated or corrupt?); "
            "save it with numpy.savez."
        ) from None
    with zf:
        members = {n[: -len(".npy")]: n for n in zf.namelist() if n.endswith(".npy")}
        out: dict[str, np.ndarray] = {}
        for spec in inputs:
            name = spec.name
            key = (
                name
                if name in members
                else (next(iter(members)) if len(inputs) == 1 and len(members) == 1 else None)
            )
            if key is None:
                raise ExportError(
                    f"calibration file {path} has no array '{name}' (it has {sorted(members) or 'none'}); "
                    "save the observations under the model's input names."
                )
            try:
                shape, dtype = _member_header(zf, members[key])
                if dtype.hasobject:
                    raise ValueError("object arrays are not accepted")
                expected = tuple(s for s in spec.shape[1:])
                if len(shape) != len(expected) + 1 or shape[1:] != expected:
                    raise ExportError(
                        f"calibration array '{key}' has shape {shape}; "
                        f"the model takes (N, {', '.join(map(str, expected))})."
                    )
                if (
                    shape[0] < 1
                    or shape[0] > MAX_CALIBRATION_ROWS
                    or int(np.prod(shape)) * dtype.itemsize > MAX_CALIBRATION_BYTES
                ):
                    raise ExportError(
                        f"calibration array '{key}' has {shape[0]} rows; "
                        f"give between 1 and {MAX_CALIBRATION_ROWS} observations (at most 1 GiB)."
                    )
                with zf.open(members[key]) as fh:
                    arr = np.lib.format.read_array(fh, allow_pickle=False)
            except ExportError:
                raise
            except Exception as exc:
                raise ExportError(
                    f"calibration array '{key}' in {path} cannot be read ({exc}); "
                    "save it again with numpy.savez."
                ) from None
            if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
                raise ExportError(
                    f"calibration array '{key}' holds {arr.dtype} values; save numeric observations."
                )
            arr = arr.astype(np.dtype(spec.dtype))
            if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
                raise ExportError(
                    f"calibration array '{key}' in {path} contains NaN or infinity; drop those rows."
                )
            out[name] = arr
    rows = {a.shape[0] for a in out.values()}
    if len(rows) != 1:
        raise ExportError(
            f"calibration arrays in {path} have different row counts {sorted(rows)}; "
            "give one row per observation."
        )
    return out
