"""The `tether` console script as a user runs it: real processes, real files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TETHER = [sys.executable, "-m", "tether.cli"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TETHER, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "no-such-preset"], "unknown preset"),
        (["train", "cartpole", "--set", "training.bogus=1"], "unknown config key 'training.bogus'"),
        (["train", "cartpole", "--set", "training.learning_rate=abc"], "training.learning_rate"),
        (["train", "cartpole", "--set", "oops"], "section.key=value"),
        (["eval", "does-not-exist"], "neither a run directory"),
        (["train", "cartpole", "--resume", "--run-dir", "nowhere"], "holds no Tether run"),
    ],
)
def test_user_mistakes_exit_2_with_one_line_and_no_traceback(tmp_path, args, fragment):
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


def test_train_then_eval_json_and_gif(tmp_path, cartpole_overrides):
    sets = [arg for o in cartpole_overrides for arg in ("--set", o)]
    proc = run("train", "cartpole", "--run-dir", "r", "--eval-episodes", "5", *sets, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "mean return" in proc.stdout
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["episodes"] == 5
    proc = run("eval", "r", "--episodes", "3", "--json", "--gif", "out.gif", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"mean_return", "std_return", "success_rate", "episodes"} <= set(result)
    assert result["episodes"] == 3 and result["gif_frames"] > 1
    assert (tmp_path / "out.gif").read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    # Resume the same run for more steps: counters continue.
    proc = run(
        "train",
        "cartpole",
        "--resume",
        "--run-dir",
        "r",
        "--steps",
        "2048",
        "--eval-episodes",
        "0",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "step 2,048" in proc.stdout


def test_config_show_prints_resolved_defaults(tmp_path):
    proc = run("config", "show", "lunabotics", "--set", "training.learning_rate=0.001", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "learning_rate: 0.001" in proc.stdout and "lambda_gae: 0.95" in proc.stdout


def test_train_records_the_run_in_the_store(tmp_path, cartpole_overrides):
    sets = [arg for o in cartpole_overrides for arg in ("--set", o)]
    db = f"sqlite:///{tmp_path / 'history.db'}"
    proc = run(
        "train", "cartpole", "--run-dir", "runs/cp-1", "--eval-episodes", "0", "--db", db, *sets, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    proc = run("runs", "show", "cp-1", "--db", db, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["status"] == "completed" and record["algorithm"] == "ppo"
