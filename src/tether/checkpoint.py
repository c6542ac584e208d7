"""Atomic, safe checkpoints: a plain dict of tensors and JSON-like values written with
`torch.save` to a temp file and renamed into place, read back with `weights_only=True` so a
checkpoint can never run code."""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether.errors import TetherError


class CheckpointError(TetherError):
    """A checkpoint is missing, truncated or not one of ours; the message says which."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes 0600 files; exports are copied and served to devices, so use the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Atomically save a checkpoint dict (tensors, numbers, strings, lists, dicts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({exc.__class__.__name__}): it is truncated, corrupt or "
            "not a Tether checkpoint."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a Tether state dict.")
    return state


def rng_state() -> dict[str, Any]:
    """The global RNG states a resume must restore (learners keep their own generators too)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": _np_state_to_plain(np.random.get_state(legacy=True)),
        "python": _py_state_to_plain(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _np_state_to_plain(st: Any) -> list[Any]:
    kind, keys, pos, has_gauss, cached = st
    return [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]


def _py_state_to_plain(st: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = st
    return [version, list(internal), gauss]


def generator_state(gen: np.random.Generator) -> dict[str, Any]:
    """A numpy Generator's state as plain values (safe to store with `weights_only`)."""
    return dict(gen.bit_generator.state)


def set_generator_state(gen: np.random.Generator, state: dict[str, Any]) -> None:
    gen.bit_generator.state = state


class CheckpointManager:
    """Numbered checkpoints in one directory, keeping the last `keep`."""

    def __init__(self, directory: Path, keep: int = 3, prefix: str = "ckpt_") -> None:
        self.directory = directory
        self.keep = keep
        self.prefix = prefix
        self._pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.pt$")

    def path_for(self, number: int) -> Path:
        return self.directory / f"{self.prefix}{number}.pt"

    def list(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = self._pattern.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        paths = self.list()
        return paths[-1] if paths else None

    def save(self, number: int, state: dict[str, Any]) -> Path:
        path = save_checkpoint(self.path_for(number), state)
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path
