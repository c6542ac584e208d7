"""`tether export` and `tether infer` on real checkpoints, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from tether.algos import algorithm_module
from tether.algos.base import Transitions
from tether.algos.qtable import QTableLearner, parse_qtable_json
from tether.checkpoint import save_checkpoint
from tether.commands.export import register
from tether.config import load_config
from tether.envs import final_observations, make_vector_env
from tether.export.qtable import export_qtable_json
from tether.export.runtime import ExportError, load_runtime, sha256_file
from tether.spaces import space_to_dict
from tether.trainer import build_learner

app = typer.Typer()
register(app, typer.Typer())
runner = CliRunner()


def _train(config: Any, steps: int) -> tuple[Any, Any, Any]:
    env = make_vector_env(config.environment, config.rewards)
    learner = build_learner(
        config, env.single_observation_space, env.single_action_space, torch.device("cpu")
    )
    obs, _ = env.reset(seed=0)
    for _ in range(steps):
        out = learner.act(obs)
        nxt, reward, term, trunc, info = env.step(out.action)
        learner.observe(
            Transitions(obs, out.action, reward, final_observations(nxt, info), term, trunc, out.extras)
        )
        if learner.ready():
            learner.update()
        obs = nxt
    env.close()
    return learner, env.single_observation_space, env.single_action_space


def _checkpoint(path: Path, preset: str, overrides: list[str], steps: int, **patch: Any) -> tuple[Path, Any]:
    """A checkpoint in the trainer's format (`tether.trainer.Trainer.checkpoint_state`)."""
    config, _ = load_config(preset, overrides)
    learner, obs_space, act_space = _train(config, steps)
    state = {
        "format": "tether-checkpoint",
        "version": 1,
        "algorithm": config.algorithm,
        "config": config.to_dict(),
        "spaces": {"observation": space_to_dict(obs_space), "action": space_to_dict(act_space)},
        "learner": learner.state_dict(),
        "trainer": {"steps": steps * config.environment.num_envs, "updates": 3},
        "metrics": {"train/episode_reward_ma100": -12.5},
    }
    state.update(patch)
    save_checkpoint(path, state)
    return path, learner


@pytest.fixture(scope="module")
def luna_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("runs") / "lunabotics-test"
    overrides = [
        "environment.num_envs=4",
        "training.rollout_steps=16",
        "training.num_epochs=2",
        "training.batch_size=32",
    ]
    _, learner = _checkpoint(run / "final.pt", "lunabotics", overrides, 40)
    return run, learner


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_export_verify_optimize_json(luna_run: tuple[Path, Any]) -> None:
    run, learner = luna_run
    result = invoke(
        "export", str(run), "--format", "onnx", "--verify", "--optimize", "--json", "--samples", "64"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    files = {Path(f["path"]).name: f for f in data["files"]}
    assert set(files) == {"policy.onnx", "policy.opt.onnx"}
    for f in files.values():
        assert f["verify"]["passed"] and f["verify"]["max_abs_diff"] <= 1e-5
        assert f["verify"]["n_recorded"] == 64  # recorded from the job's own environment
        assert f["verify"]["latency_us"] > 0
    side = json.loads((run / "exports" / "policy.onnx.json").read_text())
    assert side["algorithm"] == "ppo" and side["source"]["checkpoint"] == "final.pt"
    assert (
        side["source"]["run"] == "lunabotics-test" and side["source"]["environment"] == "tether/Lunabotics-v0"
    )
    assert side["training"]["metrics"]["train/episode_reward_ma100"] == -12.5
    assert side["training"]["counters"]["updates"] == 3
    assert side["accuracy"]["passed"] is True
    # Acceptance: the exported action is `tether eval`'s deterministic action on the same observations.
    env = make_vector_env(load_config("lunabotics", ["environment.num_envs=8"])[0].environment)
    obs, _ = env.reset(seed=123)
    for _ in range(5):
        obs, *_ = env.step(learner.act(obs, explore=False).action)
    env.close()
    got = load_runtime(run / "exports" / "policy.onnx", "cpu").run(obs)
    assert np.max(np.abs(got - learner.act(obs, explore=False).action)) <= 1e-5


def test_export_table_and_int8_with_calibration_file(luna_run: tuple[Path, Any], tmp_path: Path) -> None:
    run, _ = luna_run
    env = make_vector_env(load_config("lunabotics", ["environment.num_envs=16"])[0].environment)
    obs, _ = env.reset(seed=1)
    rows = []
    for _ in range(8):
        rows.append(obs)
        obs, *_ = env.step(np.stack([env.single_action_space.sample() for _ in range(16)]))
    env.close()
    np.savez(tmp_path / "calib.npz", obs=np.concatenate(rows))
    result = invoke(
        "export",
        str(run),
        "-f",
        "onnx-int8",
        "--calibration",
        str(tmp_path / "calib.npz"),
        "--out",
        str(tmp_path / "out"),
        "--name",
        "rover",
    )
    assert result.exit_code == 0, result.output
    assert "rover.int8.onnx" in result.output and "pass" in result.output and "max abs diff" in result.output
    side = json.loads((tmp_path / "out" / "rover.int8.onnx.json").read_text())
    assert side["quantization"]["mode"] == "static" and side["quantization"]["calibration_samples"] == 128
    assert side["accuracy"]["judged_on"] == "recorded"


def test_infer_on_an_export_with_npu_fallback(luna_run: tuple[Path, Any], tmp_path: Path) -> None:
    run, _ = luna_run
    assert invoke("export", str(run), "--out", str(tmp_path), "--no-record").exit_code == 0
    result = invoke("infer", str(tmp_path / "policy.onnx"), "--use-npu", "--samples", "3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["provider"] == "CPUExecutionProvider" and data["inputs"] == ["obs"]
    assert np.asarray(data["outputs"]["action"]).shape == (3, 3)
    np.savez(tmp_path / "obs.npz", obs=np.zeros((2, 28), np.float32))
    result = invoke("infer", str(tmp_path / "policy.onnx"), "--obs", str(tmp_path / "obs.npz"))
    # Rich wraps the table title to the terminal width; compare with whitespace collapsed.
    assert result.exit_code == 0 and "policy.onnx on CPUExecutionProvider" in " ".join(result.output.split())


def _error(result: Any) -> str:
    assert isinstance(result.exception, ExportError) or result.exception.__class__.__name__.endswith(
        "Error"
    ), result
    return str(result.exception)


def test_checkpoint_of_another_or_unknown_algorithm(tmp_path: Path, luna_run: tuple[Path, Any]) -> None:
    run, _ = luna_run
    good = torch.load(run / "final.pt", weights_only=True)
    save_checkpoint(tmp_path / "unknown.pt", {**good, "algorithm": "a2c"})
    assert "unknown algorithm 'a2c'" in _error(invoke("export", str(tmp_path / "unknown.pt")))
    save_checkpoint(
        tmp_path / "q.pt",
        {**good, "algorithm": "qtable", "config": {**good["config"], "training": {"algorithm": "qtable"}}},
    )
    assert "no neural policy" in _error(invoke("export", str(tmp_path / "q.pt")))
    save_checkpoint(tmp_path / "lie.pt", {**good, "algorithm": "dqn"})
    assert "says it holds a dqn learner but its config trains ppo" in _error(
        invoke("export", str(tmp_path / "lie.pt"))
    )
    # A SAC config with PPO weights: the state does not fit the learner.
    sac_training = algorithm_module("sac").Config().model_dump(mode="json")
    save_checkpoint(
        tmp_path / "swap.pt",
        {**good, "algorithm": "sac", "config": {**good["config"], "training": sac_training}},
    )
    assert "do not fit the sac learner" in _error(invoke("export", str(tmp_path / "swap.pt")))
    save_checkpoint(tmp_path / "foreign.pt", {"weights": torch.zeros(3)})
    assert "not a Tether training checkpoint" in _error(invoke("export", str(tmp_path / "foreign.pt")))


def test_qtable_run_exports_its_table_as_json(tmp_path: Path, luna_run: tuple[Path, Any]) -> None:
    run_dir = tmp_path / "frozenlake"
    _, learner = _checkpoint(run_dir / "final.pt", "frozenlake-qtable", [], 3000)
    result = invoke("export", str(run_dir), "--format", "qtable-json", "--json")
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.output.strip().splitlines()[-1])["files"]
    path = Path(entry["path"])
    assert path == run_dir / "exports" / "policy.qtable.json"
    document = json.loads(path.read_text())
    assert learner.num_states > 1 and parse_qtable_json(document) == learner.table
    side = json.loads((run_dir / "exports" / "policy.qtable.json.json").read_text())
    assert side["model_format"] == "qtable-json" and side["read_back"] == "identical"
    assert side["sha256"] == entry["sha256"] == sha256_file(path)
    assert side["num_entries"] == learner.num_entries and side["source"]["job"] == "frozenlake-qtable"
    # A device importing the file acts as the trained learner does.
    imported = QTableLearner(learner.config, learner.observation_space, learner.action_space)
    imported.from_json(document)
    states = np.arange(16)
    assert np.array_equal(
        imported.act(states, explore=False).action, learner.act(states, explore=False).action
    )
    # The wrong pairings say what to do and write nothing.
    assert "export its table with --format qtable-json" in _error(invoke("export", str(run_dir)))
    assert not (run_dir / "exports" / "policy.onnx").exists()
    luna, _ = luna_run
    assert "exports tabular Q-learning runs" in _error(invoke("export", str(luna), "--format", "qtable-json"))
    assert not (luna / "exports" / "policy.qtable.json").exists()


def test_qtable_export_refuses_a_table_json_cannot_hold(tmp_path: Path) -> None:
    learner = QTableLearner()
    learner.learn(0, 1, 1.0, 1, False)
    learner.table[0][1] = float("nan")
    with pytest.raises(ExportError, match="non-finite"):
        export_qtable_json(learner, tmp_path / "t.qtable.json")
    assert not (tmp_path / "t.qtable.json").exists()


def test_truncated_checkpoint_and_unsupported_format(tmp_path: Path, luna_run: tuple[Path, Any]) -> None:
    run, _ = luna_run
    data = (run / "final.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(invoke("export", str(tmp_path / "cut.pt")))
    assert "unsupported export format 'coreml'" in _error(invoke("export", str(run), "--format", "coreml"))
    assert not (run / "exports" / "policy.mlmodel").exists()


def _cli_error_lines(args: list[str], cwd: Path) -> list[str]:
    """Run `tether ARGS` in a real process; it must fail with exit 2 and no traceback. Returns
    its `error:` lines on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_user_mistake_is_one_line_on_stderr_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    for args in (["export", str(tmp_path / "nothing")], ["infer", str(tmp_path / "broken.onnx")]):
        assert len(_cli_error_lines(args, tmp_path)) == 1


# --- tether export --all over a registry query ---------------------------------------------------
@pytest.fixture
def registry(tmp_path: Path, luna_run: tuple[Path, Any]) -> str:
    """A real SQLite registry: `rover` v1 (staging) and v2 (production) point at the trained
    checkpoint, `rover-cut` v1 at a truncated copy, `rover-onnx` v1 at an ONNX file and
    `monster` v1 at the checkpoint again."""
    from tether.store import open_store

    run, _ = luna_run
    data = (run / "final.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "policy.onnx").write_bytes(b"onnx")
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with open_store(url) as store:
        store.models.register("rover", run / "final.pt", algorithm="ppo")
        store.models.register("rover", run / "final.pt", algorithm="ppo")
        store.models.promote("rover", 2)
        store.models.register("rover-cut", tmp_path / "cut.pt", algorithm="ppo")
        store.models.register("rover-onnx", tmp_path / "policy.onnx")
        store.models.register("monster", run / "final.pt", algorithm="ppo")
    return url


def test_export_all_exports_the_rest_when_one_fails(registry: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(
        "export", "--all", "rover*", "--db", registry, "--out", str(out), "--no-record", "--samples", "16"
    )
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    ok = [line for line in lines if line.startswith("✓")]
    bad = [line for line in lines if line.startswith("✗")]
    assert len(ok) == 1 and ok[0].startswith("✓ rover@2 (production) → ") and "policy.onnx" in ok[0]
    assert len(bad) == 1 and bad[0].startswith("✗ rover-cut@1: ") and "truncated" in bad[0]
    assert any("skipping 1 model(s)" in line and "rover-onnx@1 (onnx)" in line for line in lines)
    assert "exported 1 of 2 model(s)" in result.output
    assert "1 of 2 export(s) failed: rover-cut@1" in result.output
    side = json.loads((out / "rover" / "2" / "policy.onnx.json").read_text())
    assert side["registry"] == {"name": "rover", "version": 2, "stage": "production"}
    assert side["source"]["checkpoint"] == "final.pt"
    assert not (out / "rover-cut").exists() and not (out / "monster").exists()


def test_export_all_version_query_json(registry: str, tmp_path: Path, luna_run: tuple[Path, Any]) -> None:
    _, learner = luna_run
    out = tmp_path / "out"
    args = ["--db", registry, "--out", str(out), "--no-record", "--samples", "16", "--json"]
    result = invoke("export", "--all", "*@1", "-f", "onnx-fp16", *args)
    assert result.exit_code == 1, result.output  # rover-cut@1 is in the selection and fails
    data = json.loads(result.output.strip().splitlines()[-1])
    assert [m["model"] for m in data["models"]] == ["monster@1", "rover@1", "rover-cut@1"]
    assert data["failed"] == ["rover-cut@1"]
    good = {m["model"]: m for m in data["models"] if "error" not in m}
    for ref in ("monster@1", "rover@1"):
        names = {Path(f["path"]).name for f in good[ref]["files"]}
        assert names == {"policy.onnx", "policy.fp16.onnx"}
        assert all(f["verify"]["passed"] for f in good[ref]["files"] if "verify" in f)
    policy = load_runtime(out / "rover" / "1" / "policy.onnx", "cpu")
    obs = np.linspace(-1, 1, 28, dtype=np.float32)
    expected = learner.act(obs[None], explore=False).action[0]
    assert np.max(np.abs(policy.run(obs) - expected)) <= 1e-5
    result = invoke("export", "--all", "rover@production", *args)
    assert result.exit_code == 0, result.output
    assert [m["model"] for m in json.loads(result.output.strip().splitlines()[-1])["models"]] == ["rover@2"]


def test_export_all_mistakes_are_one_line_and_exit_2(registry: str, tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "out")]
    assert "matches no model" in _error(invoke("export", "--all", "drone*", "--db", registry, *out))
    assert "neither a version number nor a stage" in _error(
        invoke("export", "--all", "rover@nightly", "--db", registry, *out)
    )
    assert "--out" in _error(invoke("export", "--all", "rover", "--db", registry))
    assert "--db selects the registry for --all" in _error(invoke("export", "--db", registry))
    assert "or --all with a registry query" in _error(invoke("export"))
    errors = _cli_error_lines(["export", "--all", "drone*", "--db", registry, *out], tmp_path)
    assert len(errors) == 1 and "registry query 'drone*' matches no model" in errors[0]
    assert not (tmp_path / "out").exists()
