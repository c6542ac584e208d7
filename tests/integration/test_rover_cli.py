"""`tether deploy`, `tether rover-server` and `tether sim rover` flags: the dry run, the export it
makes, and every user mistake as one error line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import typer
from typer.testing import CliRunner

from tether.commands.rover import RoverCommandError, parse_image_size, register
from tether.errors import TetherError
from tether.ingest.rover import RoverPolicy
from tether.ingest.rover_server import RoverServer, RoverServerConfig
from tether.nets_rgbd import RgbdExportPolicy

pytestmark = pytest.mark.integration

app = typer.Typer()
sim_app = typer.Typer()
app.add_typer(sim_app, name="sim")
register(app, sim_app)
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt")
    server = RoverServer(
        RoverServerConfig(
            port=0, image_size=(32, 24), checkpoint_dir=directory, tensorboard_dir=None, resume=False
        )
    )
    with torch.no_grad():
        server.net.policy_head[-2].bias.fill_(0.7)  # a recognisable policy
    return server.save_checkpoint()


def _main(*args: str) -> subprocess.CompletedProcess[str]:
    """Through the real entry point, as a user runs it (only the rover commands, for a fast start)."""
    code = "import tether.cli as c; c.COMMAND_MODULES[:] = ['tether.commands.rover']; c.main()"
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_parse_image_size() -> None:
    assert parse_image_size("424x240") == (424, 240)
    assert parse_image_size(" 106 X 60 ") == (106, 60)
    for bad in ("424", "x240", "424x", "10x10", "5000x10", "axb"):
        with pytest.raises(RoverCommandError):
            parse_image_size(bad)


def test_deploy_dry_run_exports_and_prints_the_copy_commands(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = runner.invoke(
        app,
        [
            "deploy",
            str(checkpoint),
            "--rover",
            "192.168.1.50",
            "--user",
            "rover",
            "--out-dir",
            str(out),
            "--dry-run",
        ],
        env={"COLUMNS": "400"},
    )
    assert result.exit_code == 0, result.output
    name = checkpoint.stem
    onnx_path, sidecar = out / f"{name}.onnx", out / f"{name}.onnx.json"
    assert onnx_path.is_file() and sidecar.is_file()
    text = result.output
    assert (
        f"scp -q -o BatchMode=yes -o ConnectTimeout=10 {onnx_path} {sidecar} rover@192.168.1.50:models/"
        in text
    )
    assert "ssh -o BatchMode=yes -o ConnectTimeout=10 rover@192.168.1.50 'mkdir -p models'" in text
    assert f"ln -sfn {name}.onnx models/.remote_trained.onnx.tmp" in text
    assert "mv -Tf models/.remote_trained.onnx.tmp models/remote_trained.onnx" in text
    # No rknn-toolkit2 here: the conversion command for the rover is printed, with fixed shapes.
    assert "conversion happens on the rover" in text
    assert "from rknn.api import RKNN" in text and "[1, 3, 24, 32]" in text and "remote_trained.rknn" in text
    assert "running:" not in text  # nothing was run

    meta = json.loads(sidecar.read_text())
    assert meta["image_size"] == [32, 24] and meta["max_depth"] == 10.0 and len(meta["log_std"]) == 2
    policy = RoverPolicy.load(onnx_path)
    assert policy.image_size == (32, 24) and policy.log_std is not None
    rng = np.random.default_rng(0)
    rgb, depth = (
        rng.integers(0, 256, (24, 32, 3), dtype=np.uint8),
        rng.uniform(0, 9, (24, 32)).astype(np.float32),
    )
    proprio = np.zeros(6, np.float32)
    feeds = policy.inputs(rgb, depth, proprio)
    session_out = ort.InferenceSession(str(onnx_path)).run(None, feeds)[0]
    from tether.ingest.rover_server import load_rover_net

    net, _ = load_rover_net(checkpoint)
    with torch.no_grad():
        want = RgbdExportPolicy(net)(
            *(torch.from_numpy(feeds[k]) for k in ("rgb", "depth", "proprio"))
        ).numpy()
    assert np.abs(session_out - want).max() <= 1e-4
    assert np.allclose(policy.act(rgb, depth, proprio), np.tanh(0.7), atol=0.05)


def _invoke_error(*args: str) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "400"})
    assert isinstance(result.exception, TetherError), (args, result.output, result.exception)
    return str(result.exception)


def test_deploy_user_mistakes_are_one_line_errors(checkpoint: Path, tmp_path: Path) -> None:
    # Once through the real entry point: one `error:` line on stderr, exit code 2, no traceback.
    missing = _main("deploy", str(tmp_path / "nope.pt"), "--rover", "host", "--dry-run")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not exist" in errors[0]
    out = str(tmp_path / "o")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert "not a rover checkpoint" in _invoke_error(
        "deploy", str(foreign), "--rover", "h", "--dry-run", "--out-dir", out
    )
    truncated = tmp_path / "ppo_update_3.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:500])
    assert "truncated, corrupt" in _invoke_error(
        "deploy", str(truncated), "--rover", "h", "--dry-run", "--out-dir", out
    )
    assert "not a host name" in _invoke_error(
        "deploy", str(checkpoint), "--rover", "h;reboot", "--dry-run", "--out-dir", out
    )
    assert "not a valid user" in _invoke_error(
        "deploy", str(checkpoint), "--rover", "h", "--user", "-oProxyCommand=x", "--dry-run", "--out-dir", out
    )
    assert "--models-dir" in _invoke_error(
        "deploy",
        str(checkpoint),
        "--rover",
        "h",
        "--models-dir",
        "m; rm -rf x",
        "--dry-run",
        "--out-dir",
        out,
    )
    assert "--rknn must be" in _invoke_error(
        "deploy", str(checkpoint), "--rover", "h", "--rknn", "x", "--out-dir", out
    )


def test_deploy_reports_a_failing_copy(checkpoint: Path, tmp_path: Path) -> None:
    # Real ssh to a port where nothing listens: refused at once, never a password prompt.
    message = _invoke_error(
        "deploy", str(checkpoint), "--rover", "127.0.0.1", "--ssh-port", "1", "--out-dir", str(tmp_path)
    )
    assert "failed" in message and "ssh" in message and "refused" in message.lower()


def test_server_and_sim_flag_mistakes_are_errors(tmp_path: Path) -> None:
    ckpt = ["--checkpoint-dir", str(tmp_path / "c"), "--tensorboard-dir", str(tmp_path / "r")]
    assert "between 16x16" in _invoke_error("rover-server", "--image-size", "8x8", *ckpt)
    assert "--amp must be" in _invoke_error("rover-server", "--amp", "fp8", *ckpt)
    assert "--update-interval" in _invoke_error("rover-server", "--update-interval", "1", *ckpt)
    assert "--workers" in _invoke_error("rover-server", "--workers", "0", *ckpt)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _invoke_error("rover-server", "--device", "cuda", *ckpt)
    assert "--policy must be" in _invoke_error("sim", "rover", "--policy", "magic")
    assert "--jpeg-quality" in _invoke_error("sim", "rover", "--jpeg-quality", "0")
    assert "--rate" in _invoke_error("sim", "rover", "--rate", "-1")


def test_server_port_in_use_is_an_error(tmp_path: Path) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        message = _invoke_error(
            "rover-server",
            "--port",
            str(port),
            "--image-size",
            "16x16",
            "--checkpoint-dir",
            str(tmp_path / "c"),
            "--tensorboard-dir",
            str(tmp_path / "r"),
        )
    finally:
        sock.close(linger=0)
    assert "pick another --port" in message
