"""The device-side runtime: providers and their CPU fallback, and damaged or foreign model files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from tether.export.onnx import export_onnx
from tether.export.runtime import ExportError, load_runtime, provider_from_flags, sidecar_path
from tether.nets import mlp

OBS = gym.spaces.Box(-5.0, 5.0, (6,), np.float32)
ACT = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    policy = torch.nn.Sequential(mlp(6, [32], 2), torch.nn.Tanh()).eval()
    return export_onnx(policy, OBS, ACT, tmp_path_factory.mktemp("rt") / "policy.onnx").path


def _copy(model: Path, tmp_path: Path, data: bytes | None = None, sidecar: bool = True) -> Path:
    target = tmp_path / "copy.onnx"
    target.write_bytes(model.read_bytes() if data is None else data)
    if sidecar:
        sidecar_path(target).write_text(sidecar_path(model).read_text())
    return target


def test_runs_single_observations_and_batches(model: Path) -> None:
    rt = load_runtime(model, provider="cpu")
    assert (
        rt.provider == "CPUExecutionProvider" and rt.input_names == ["obs"] and rt.output_names == ["action"]
    )
    assert rt.metadata is not None and rt.metadata["model_format"] == "onnx"
    batch = np.random.default_rng(0).uniform(-5, 5, (10, 6))  # float64 is cast to the input dtype
    out = rt.run(batch)
    assert out.shape == (10, 2) and out.dtype == np.float32 and np.all(np.abs(out) <= 1)
    np.testing.assert_array_equal(rt.run(batch[3].tolist()), out[3])
    for i in range(10):  # the single-observation fast path (bound buffers) agrees with the batch path
        np.testing.assert_array_equal(rt.run(batch[i]), out[i])
    assert rt.run(batch[0]) is not rt.run(batch[0])  # results are never the reused buffer
    with pytest.raises(ExportError, match="shape"):
        rt.run(np.zeros(5, np.float32))
    with pytest.raises(ExportError, match="dimensions"):
        rt.run(np.zeros((2, 3, 6)))
    with pytest.raises(ExportError, match="lacks the model input"):
        rt.run({"proprio": np.zeros(6)})


def test_single_observation_run_all_and_threads_use_the_bound_buffers(tmp_path: Path) -> None:
    """A Q-network's two outputs through the bound fast path equal the batch path, results are
    fresh arrays, and threads sharing one runtime each get their own observation's answer."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(1)
    net = mlp(6, [16], 3).eval()
    path = export_onnx(net, OBS, gym.spaces.Discrete(3), tmp_path / "q.onnx").path
    rt = load_runtime(path, provider="cpu")
    assert rt.output_names == ["action", "q_values"]
    batch = np.random.default_rng(1).uniform(-5, 5, (64, 6)).astype(np.float32)
    full = rt.run_all(batch)
    first = rt.run_all(batch[0])
    np.testing.assert_array_equal(first["action"], full["action"][0])
    np.testing.assert_array_equal(first["q_values"], full["q_values"][0])
    assert first["q_values"] is not rt.run_all(batch[0])["q_values"]
    np.testing.assert_array_equal(rt.run(batch[5].astype(np.float64)), full["action"][5])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: rt.run(batch[i % 64]), range(2000)))
    np.testing.assert_array_equal(np.stack(got), np.resize(full["action"], 2000))


def test_a_discrete_state_runs_as_a_0d_observation(tmp_path: Path) -> None:
    class Table(torch.nn.Module):  # a Q-table over 5 states as a policy: argmax per state
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Parameter(torch.randn(5, 3))

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return self.q[obs]

    torch.manual_seed(2)
    path = export_onnx(
        Table().eval(), gym.spaces.Discrete(5), gym.spaces.Discrete(3), tmp_path / "t.onnx"
    ).path
    rt = load_runtime(path, provider="cpu")
    states = np.arange(5, dtype=np.int64)
    actions = rt.run(states)
    for state in states:
        got = rt.run(np.asarray(state))  # a 0-d array takes the bound fast path
        assert isinstance(got, np.integer) and got == actions[state]


@pytest.mark.parametrize("provider", ["cuda", "directml", "coreml", "openvino", "npu", "coral"])
def test_absent_accelerator_falls_back_to_cpu_with_one_log_line(
    model: Path, provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    if provider == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with caplog.at_level(logging.INFO, logger="tether.export.runtime"):
        rt = load_runtime(model, provider=provider)
    assert rt.provider == "CPUExecutionProvider"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "CPU" in warnings[0].getMessage()
    assert rt.run(np.zeros(6)).shape == (2,)


def test_auto_and_cpu_do_not_warn(model: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tether.export.runtime"):
        load_runtime(model, provider="auto")
        load_runtime(model, provider="cpu")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_provider_flags() -> None:
    assert provider_from_flags("auto", use_npu=True) == "npu"
    assert provider_from_flags("cpu", use_coral=True) == "coral"
    assert provider_from_flags("cuda") == "cuda"
    with pytest.raises(ExportError, match="not both"):
        provider_from_flags(use_npu=True, use_coral=True)
    with pytest.raises(ExportError, match="unknown provider 'tpu'"):
        provider_from_flags("tpu")


def test_unknown_provider_and_threads(model: Path) -> None:
    with pytest.raises(ExportError, match="unknown provider"):
        load_runtime(model, provider="gpu")
    with pytest.raises(ExportError, match="threads"):
        load_runtime(model, provider="cpu", threads=0)


def test_truncated_model_fails_its_checksum(model: Path, tmp_path: Path) -> None:
    data = model.read_bytes()
    path = _copy(model, tmp_path, data[: len(data) // 2])
    with pytest.raises(ExportError, match="does not match the checksum"):
        load_runtime(path)


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.1])
def test_truncated_model_without_sidecar_is_one_clear_error(model: Path, tmp_path: Path, cut: float) -> None:
    data = model.read_bytes()
    path = _copy(model, tmp_path, data[: int(len(data) * cut)], sidecar=False)
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        load_runtime(path)


def test_corrupt_model_is_one_clear_error(model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = _copy(model, tmp_path, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), sidecar=False)
    with pytest.raises(ExportError, match="truncated or corrupt"):
        load_runtime(path)
    import onnx

    # One flipped byte inside the weights still parses: only the checksum can tell.
    data = model.read_bytes()
    weights = max(onnx.load(str(model)).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    at = data.find(weights) + len(weights) // 2
    flipped = bytearray(data)
    flipped[at] ^= 0x40
    path = _copy(model, tmp_path, bytes(flipped))
    with pytest.raises(ExportError, match="checksum"):
        load_runtime(path)
    obs = np.linspace(-1, 1, 6)
    assert not np.array_equal(
        load_runtime(path, verify_checksum=False).run(obs), load_runtime(model).run(obs)
    )


def test_missing_empty_and_foreign_files(model: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        load_runtime(tmp_path / "nothing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ExportError, match="empty"):
        load_runtime(tmp_path / "empty.onnx")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ExportError, match="not an exported model"):
        load_runtime(tmp_path / "weights.pt")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something-else"}', "not written by"),
        ("[1, 2]", "not written by"),
    ],
)
def test_bad_sidecar_is_one_clear_error(model: Path, tmp_path: Path, text: str, fragment: str) -> None:
    path = _copy(model, tmp_path)
    sidecar_path(path).write_text(text)
    with pytest.raises(ExportError, match=fragment):
        load_runtime(path)


def test_tflite_and_rknn_need_their_interpreters(tmp_path: Path) -> None:
    import importlib.util

    (tmp_path / "m.tflite").write_bytes(b"TFL3" + bytes(64))
    (tmp_path / "m.rknn").write_bytes(b"RKNN" + bytes(64))
    if (
        importlib.util.find_spec("ai_edge_litert") is None
        and importlib.util.find_spec("tflite_runtime") is None
    ):
        with pytest.raises(ExportError, match="ai-edge-litert"):
            load_runtime(tmp_path / "m.tflite")
    else:
        with pytest.raises(ExportError, match="not a readable TFLite model"):
            load_runtime(tmp_path / "m.tflite")
    if importlib.util.find_spec("rknnlite") is None:
        with pytest.raises(ExportError, match="rknn-toolkit-lite2"):
            load_runtime(tmp_path / "m.rknn")


def test_runtime_does_not_import_torch(model: Path) -> None:
    """A rover runs the policy with numpy and onnxruntime only."""
    code = (
        "import sys, json, numpy as np\n"
        "from tether.export.runtime import load_runtime\n"
        f"rt = load_runtime({str(model)!r}, provider='cpu')\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'shape': list(rt.run(np.zeros(6)).shape)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch": False, "shape": [2]}
