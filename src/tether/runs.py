"""Run directories and loading a trained learner back from one (or from a checkpoint file)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tether.algos import Learner
from tether.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from tether.config import JobConfig, build_config
from tether.errors import TetherError
from tether.spaces import space_from_dict

DEFAULT_RUNS_DIR = Path("runs")


def new_run_dir(preset: str, base: Path = DEFAULT_RUNS_DIR) -> Path:
    """`runs/<preset>-<timestamp>/`, made unique if two runs start in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{preset}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = base / f"{preset}-{stamp}-{n}"
    return path


def latest_run_dir(preset: str, base: Path = DEFAULT_RUNS_DIR) -> Path | None:
    if not base.is_dir():
        return None
    runs = [p for p in base.glob(f"{preset}-*") if (p / "config.yaml").is_file()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file as given, or the newest checkpoint of a run directory."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise TetherError(f"{path} is neither a run directory nor a checkpoint file.")
    candidates = [
        p for p in [path / "final.pt", CheckpointManager(path / "checkpoints").latest()] if p and p.is_file()
    ]
    if not candidates:
        raise TetherError(f"run directory {path} has no checkpoint yet; train it first or pass a .pt file.")
    return max(candidates, key=lambda p: p.stat().st_mtime)


@dataclass
class LoadedRun:
    learner: Learner
    config: JobConfig
    checkpoint: Path
    observation_space: Any
    action_space: Any
    meta: dict[str, Any] = field(default_factory=dict)


def load_learner(run_or_checkpoint: Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the learner of a run (or checkpoint) with its trained weights."""
    from tether.trainer import CHECKPOINT_FORMAT, build_learner

    path = resolve_checkpoint(Path(run_or_checkpoint))
    state = load_checkpoint(path)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a Tether training checkpoint (no '{CHECKPOINT_FORMAT}' marker)."
        )
    config = build_config(state["config"])
    obs_space = space_from_dict(state["spaces"]["observation"])
    act_space = space_from_dict(state["spaces"]["action"])
    learner = build_learner(config, obs_space, act_space, torch.device(device))
    learner.load_state_dict(state["learner"])
    meta = {
        "trainer": state.get("trainer", {}),
        "metrics": state.get("metrics", {}),
        "algorithm": state["algorithm"],
    }
    return LoadedRun(learner, config, path, obs_space, act_space, meta)
