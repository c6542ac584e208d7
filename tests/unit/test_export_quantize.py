"""FP16 and INT8 exports stay within their documented tolerances of PyTorch; the verification
logic judges correctly; calibration files are checked before they are trusted."""

from __future__ import annotations

import functools
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import onnx
import pytest
from export_support import make_learner

from tether.export.onnx import ExportError, TensorSpec, export_learner
from tether.export.quantize import load_calibration
from tether.export.runtime import load_runtime
from tether.export.verify import TOLERANCES, compare_outputs


@functools.cache
def learner(kind: str) -> tuple[Any, gym.Space[Any], gym.Space[Any], Any]:
    return make_learner(kind)


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("kind", ["ppo_box", "ppo_discrete", "dqn", "sac", "rgbd"])
def test_fp16_within_tolerance_with_float32_io(tmp_path: Path, kind: str) -> None:
    lrn, obs_space, act_space, recorded = learner(kind)
    base, half = export_learner(lrn, obs_space, act_space, tmp_path, "onnx-fp16", recorded=recorded)
    assert half.path.name == "policy.fp16.onnx" and half.verify is not None
    assert half.verify.passed, half.verify
    assert half.verify.n_random == 256 and half.verify.n_recorded > 0
    model = onnx.load(str(half.path))
    assert {t.data_type for t in model.graph.initializer} >= {onnx.TensorProto.FLOAT16}
    io_types = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert onnx.TensorProto.FLOAT16 not in io_types
    assert half.size_bytes < base.size_bytes
    if base.size_bytes > 100_000:  # weights dominate: the file halves
        assert half.size_bytes < 0.6 * base.size_bytes
    side = half.sidecar
    assert side["model_format"] == "onnx-fp16" and side["derived_from"]["sha256"] == base.sha256
    assert side["accuracy"]["passed"] is True and side["accuracy"]["action_agreement"] >= 0.98


@pytest.mark.parametrize("kind", ["ppo_box", "dqn", "sac"])
def test_int8_dynamic_within_tolerance(tmp_path: Path, kind: str) -> None:
    lrn, obs_space, act_space, recorded = learner(kind)
    base, q = export_learner(lrn, obs_space, act_space, tmp_path, "onnx-int8", recorded=recorded)
    assert q.verify is not None and q.verify.passed, q.verify
    assert "MatMulInteger" in _ops(q.path) or "ConvInteger" in _ops(q.path)
    assert q.sidecar["quantization"]["mode"] == "dynamic"
    assert q.size_bytes < base.size_bytes
    if base.size_bytes > 100_000:
        assert q.size_bytes < 0.4 * base.size_bytes


@pytest.mark.parametrize("kind", ["ppo_box", "dqn", "rgbd"])
def test_int8_static_calibrated_on_recorded_observations(tmp_path: Path, kind: str) -> None:
    lrn, obs_space, act_space, recorded = learner(kind)
    calib = recorded if isinstance(recorded, dict) else {"obs": recorded}
    _, q = export_learner(
        lrn, obs_space, act_space, tmp_path, "onnx-int8", recorded=recorded, calibration=calib
    )
    assert q.verify is not None and q.verify.passed, q.verify
    assert q.verify.judged_on == "recorded"
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(q.path)
    info = q.sidecar["quantization"]
    assert info["mode"] == "static" and info["calibration_samples"] == len(next(iter(calib.values())))


def test_static_int8_without_observations_is_refused(tmp_path: Path) -> None:
    lrn, obs_space, act_space, _ = learner("dqn")
    with pytest.raises(ExportError, match="static INT8 needs recorded observations"):
        export_learner(lrn, obs_space, act_space, tmp_path, "onnx-int8", int8_mode="static")


def test_quantized_model_runs_through_the_runtime(tmp_path: Path) -> None:
    lrn, obs_space, act_space, recorded = learner("ppo_box")
    _, q = export_learner(lrn, obs_space, act_space, tmp_path, "onnx-int8")
    action = load_runtime(q.path, "cpu").run(recorded[:50])
    expected = lrn.act(recorded[:50], explore=False).action
    assert np.max(np.abs(action - expected)) <= TOLERANCES["onnx-int8"].atol + TOLERANCES["onnx-int8"].rtol


# --- the verdict --------------------------------------------------------------------------------
BOX = [TensorSpec("action", "float32", [None, 2])]
DISCRETE = [TensorSpec("action", "int64", [None]), TensorSpec("q_values", "float32", [None, 3])]


def _ref(n: int = 100) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (n, 2)).astype(np.float32)


def test_fp32_fails_on_a_single_element_off_by_1e4() -> None:
    ref = _ref()
    got = ref.copy()
    assert compare_outputs("onnx", "m", "cpu", BOX, [ref], [got], 50, 50).passed
    got[7, 1] += 1e-4
    report = compare_outputs("onnx", "m", "cpu", BOX, [ref], [got], 50, 50)
    assert not report.passed and report.max_abs_diff == pytest.approx(1e-4, rel=1e-2)
    assert report.action_agreement == pytest.approx(0.99)


def test_nan_output_never_passes() -> None:
    ref = _ref()
    got = ref.copy()
    got[0, 0] = np.nan
    for fmt in ("onnx", "onnx-fp16", "onnx-int8"):
        report = compare_outputs(fmt, "m", "cpu", BOX, [ref], [got], 100, 0)
        assert report.within_tolerance < 1.0 and (fmt != "onnx" or not report.passed)


def test_lossy_formats_are_judged_on_recorded_rows_when_present() -> None:
    ref = _ref()
    got = ref.copy()
    got[:50] += 0.5  # far off on the random rows only
    report = compare_outputs("onnx-int8", "m", "cpu", BOX, [ref], [got], 50, 50)
    assert report.passed and report.judged_on == "recorded"
    assert report.max_abs_diff_random == pytest.approx(0.5, rel=1e-3) and report.max_abs_diff_recorded == 0
    assert not compare_outputs("onnx-int8", "m", "cpu", BOX, [ref], [got], 100, 0).passed
    # fp32 is exact everywhere, recorded or not.
    assert not compare_outputs("onnx", "m", "cpu", BOX, [ref], [got], 50, 50).passed


def _q_with_margin(n: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    action = rng.integers(0, 3, n)
    q = np.zeros((n, 3), np.float32)
    q[np.arange(n), action] = margin
    return action, q


def test_discrete_agreement_threshold() -> None:
    action, q = _q_with_margin(200, 1.0)
    flipped = action.copy()
    flipped[:3] = (flipped[:3] + 1) % 3  # 1.5 % disagree, clearly worse actions
    report = compare_outputs("onnx-fp16", "m", "cpu", DISCRETE, [action, q], [flipped, q], 200, 0)
    assert report.action_agreement == pytest.approx(0.985) and report.passed and report.near_ties == 0
    flipped[:10] = (action[:10] + 1) % 3  # 5 % disagree
    assert not compare_outputs("onnx-fp16", "m", "cpu", DISCRETE, [action, q], [flipped, q], 200, 0).passed
    assert not compare_outputs("onnx", "m", "cpu", DISCRETE, [action, q], [flipped, q], 200, 0).passed


def test_flips_between_near_tied_q_values_are_not_errors() -> None:
    action, q = _q_with_margin(200, 1e-3)  # below INT8's resolution
    flipped = action.copy()
    flipped[:40] = (action[:40] + 1) % 3
    report = compare_outputs("onnx-int8", "m", "cpu", DISCRETE, [action, q], [flipped, q], 200, 0)
    assert report.action_agreement == pytest.approx(0.8) and report.near_ties == 40 and report.passed
    # fp32 resolves a 1e-3 gap: the same flips fail there.
    assert not compare_outputs("onnx", "m", "cpu", DISCRETE, [action, q], [flipped, q], 200, 0).passed


def test_shape_mismatch_is_an_export_error() -> None:
    with pytest.raises(ExportError, match="shape"):
        compare_outputs("onnx", "m", "cpu", BOX, [_ref()], [_ref()[:, :1]], 100, 0)


# --- calibration files --------------------------------------------------------------------------
OBS = [TensorSpec("obs", "float32", [None, 4])]
DICT = [TensorSpec("rgb", "uint8", [None, 3, 2, 2]), TensorSpec("proprio", "float32", [None, 6])]


def test_calibration_file_round_trip(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(50, 4))
    np.savez(tmp_path / "c.npz", obs=data)
    out = load_calibration(tmp_path / "c.npz", OBS)
    assert out["obs"].dtype == np.float32 and out["obs"].shape == (50, 4)
    np.savez(tmp_path / "anon.npz", data)  # a single unnamed array is taken for a single input
    assert load_calibration(tmp_path / "anon.npz", OBS)["obs"].shape == (50, 4)
    rgb = np.random.default_rng(1).integers(0, 255, (5, 3, 2, 2), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", rgb=rgb, proprio=np.zeros((5, 6)))
    out = load_calibration(tmp_path / "d.npz", DICT)
    np.testing.assert_array_equal(out["rgb"], rgb)


def _npy_with_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.write_bytes(b"not a zip at all"), "not an .npz archive"),
        (
            lambda p: np.savez(p, obs=np.zeros((5, 4))) or p.write_bytes(p.read_bytes()[:40]),
            "not an .npz archive",
        ),
        (lambda p: np.savez(p, other=np.zeros((5, 4)), more=np.zeros((5, 4))), "has no array 'obs'"),
        (lambda p: np.savez(p, obs=np.zeros((5, 5))), "has shape"),
        (lambda p: np.savez(p, obs=np.zeros((5,))), "has shape"),
        (lambda p: np.savez(p, obs=np.zeros((0, 4))), "rows"),
        (lambda p: np.savez(p, obs=np.full((5, 4), np.nan)), "NaN or infinity"),
        (lambda p: np.savez(p, obs=np.array([["a"] * 4] * 2)), "holds"),
        (lambda p: np.savez(p, obs=np.array([[{"x": 1}] * 4] * 2, dtype=object)), "cannot be read"),
    ],
)
def test_bad_calibration_files_are_refused(tmp_path: Path, make: Any, fragment: str) -> None:
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(ExportError, match=fragment):
        load_calibration(path, OBS)


def test_hostile_header_is_refused_without_allocating(tmp_path: Path) -> None:
    """A 24-byte entry that claims 10^12 rows must not make us allocate terabytes."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("obs.npy", _npy_with_header((10**12, 4)))
    with pytest.raises(ExportError, match="rows"):
        load_calibration(path, OBS)


def test_pickle_payload_is_never_unpickled(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path(tmp_path / "pwned").touch, ())

    path = tmp_path / "p.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("obs.npy", _npy_with_header((1, 4), "|O") + pickle.dumps(Boom()))
    with pytest.raises(ExportError):
        load_calibration(path, OBS)
    assert not (tmp_path / "pwned").exists()


def test_dict_calibration_needs_matching_rows(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", rgb=np.zeros((5, 3, 2, 2), np.uint8), proprio=np.zeros((4, 6)))
    with pytest.raises(ExportError, match="different row counts"):
        load_calibration(tmp_path / "d.npz", DICT)
    with pytest.raises(ExportError, match="does not exist"):
        load_calibration(tmp_path / "missing.npz", DICT)
