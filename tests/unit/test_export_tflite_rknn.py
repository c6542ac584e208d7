"""TFLite (litert-torch) and RKNN (rknn-toolkit2) exports run in their own environments through a
subprocess. Their error paths are tested everywhere with real subprocesses; the conversions
themselves run where those environments exist (`TETHER_TFLITE_PYTHON` / `TETHER_RKNN_PYTHON` or
the documented default paths), see docs/export.md."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from export_support import make_learner

from tether.export.onnx import ExportError, export_learner
from tether.export.rknn import DEFAULT_RKNN_PYTHON, RKNN_PYTHON_ENV, export_rknn, find_rknn_python
from tether.export.tflite import DEFAULT_TFLITE_PYTHON, TFLITE_PYTHON_ENV, find_tflite_python


@functools.cache
def learner(kind: str) -> tuple[Any, gym.Space[Any], gym.Space[Any], Any]:
    return make_learner(kind)


def _available(finder: Any) -> bool:
    try:
        finder()
    except ExportError:
        return False
    return True


needs_tflite = pytest.mark.skipif(
    not _available(find_tflite_python),
    reason=f"no litert-torch environment ({TFLITE_PYTHON_ENV} or {DEFAULT_TFLITE_PYTHON})",
)
needs_rknn = pytest.mark.skipif(
    not _available(find_rknn_python),
    reason=f"no rknn-toolkit2 environment ({RKNN_PYTHON_ENV} or {DEFAULT_RKNN_PYTHON})",
)


# --- error paths (always run) --------------------------------------------------------------------
def test_tflite_environment_that_does_not_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(TFLITE_PYTHON_ENV, str(tmp_path / "no" / "python"))
    lrn, obs_space, act_space, _ = learner("ppo_discrete")
    with pytest.raises(ExportError, match=f"{TFLITE_PYTHON_ENV}=.* does not exist"):
        export_learner(lrn, obs_space, act_space, tmp_path / "out", "tflite")
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.skipif(
    importlib.util.find_spec("litert_torch") is not None, reason="this Python has litert-torch"
)
def test_tflite_environment_without_litert_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A real subprocess in a Python that lacks litert-torch: the worker reports it, we say so."""
    monkeypatch.setenv(TFLITE_PYTHON_ENV, sys.executable)
    lrn, obs_space, act_space, _ = learner("ppo_discrete")
    with pytest.raises(ExportError, match="has no litert-torch"):
        export_learner(lrn, obs_space, act_space, tmp_path, "tflite")
    assert not (tmp_path / "policy.tflite").exists()


def test_tflite_environment_that_is_not_python(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv(TFLITE_PYTHON_ENV, str(fake))
    lrn, obs_space, act_space, _ = learner("ppo_discrete")
    with pytest.raises(ExportError, match=r"failed \(exit 3: broken\)"):
        export_learner(lrn, obs_space, act_space, tmp_path, "tflite")


def test_rknn_environment_that_does_not_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(RKNN_PYTHON_ENV, str(tmp_path / "missing-python"))
    lrn, obs_space, act_space, _ = learner("ppo_box")
    with pytest.raises(ExportError, match=f"{RKNN_PYTHON_ENV}=.* does not exist"):
        export_learner(lrn, obs_space, act_space, tmp_path / "out", "rknn")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("rknn") is not None, reason="this Python has rknn-toolkit2")
def test_rknn_environment_without_the_toolkit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(RKNN_PYTHON_ENV, sys.executable)
    lrn, obs_space, act_space, _ = learner("ppo_box")
    with pytest.raises(ExportError, match="has no rknn-toolkit2"):
        export_learner(lrn, obs_space, act_space, tmp_path, "rknn")
    assert not (tmp_path / "policy.rknn").exists()


def test_rknn_unknown_target_and_missing_sidecar(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(RKNN_PYTHON_ENV, sys.executable)
    lrn, obs_space, act_space, _ = learner("ppo_box")
    with pytest.raises(ExportError, match="unknown RKNN target 'rk9999'"):
        export_learner(lrn, obs_space, act_space, tmp_path, "rknn", rknn_target="rk9999")
    (tmp_path / "bare.onnx").write_bytes(b"x")
    with pytest.raises(ExportError, match="has no sidecar"):
        export_rknn(
            tmp_path / "bare.onnx", tmp_path / "bare.rknn", verify_inputs=np.zeros((1, 28), np.float32)
        )


def test_missing_environment_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(TFLITE_PYTHON_ENV, raising=False)
    monkeypatch.delenv(RKNN_PYTHON_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no default environments under this home
    if importlib.util.find_spec("litert_torch") is None:
        with pytest.raises(ExportError, match=r"pip install torch==.* litert-torch"):
            find_tflite_python()
    if importlib.util.find_spec("rknn") is None:
        with pytest.raises(ExportError, match="pip install rknn-toolkit2"):
            find_rknn_python()


# --- real conversions (where the environments exist) ---------------------------------------------
@needs_tflite
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ppo_box", "dqn", "rgbd"])
def test_tflite_matches_pytorch_in_the_litert_interpreter(tmp_path: Path, kind: str) -> None:
    lrn, obs_space, act_space, recorded = learner(kind)
    (result,) = export_learner(lrn, obs_space, act_space, tmp_path, "tflite", recorded=recorded, n_verify=32)
    assert result.path.read_bytes()[4:8] == b"TFL3"
    assert result.verify is not None and result.verify.passed, result.verify
    assert result.verify.max_abs_diff is None or result.verify.max_abs_diff <= 1e-5
    side = json.loads(result.sidecar_path.read_text())
    assert side["model_format"] == "tflite" and side["accuracy"]["passed"]
    assert [i["shape"][0] for i in side["inputs"]] == [1] * len(side["inputs"])


@needs_rknn
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ppo_box", "dqn"])
def test_rknn_matches_pytorch_in_the_toolkit_simulator(tmp_path: Path, kind: str) -> None:
    lrn, obs_space, act_space, recorded = learner(kind)
    base, result = export_learner(lrn, obs_space, act_space, tmp_path, "rknn", recorded=recorded, n_verify=32)
    assert result.path.name == "policy.rknn" and base.path.name == "policy.onnx"
    assert result.verify is not None and result.verify.passed, result.verify
    side = json.loads(result.sidecar_path.read_text())
    assert side["target_platform"] == "rk3588" and side["converted_from"]["sha256"] == base.sha256
