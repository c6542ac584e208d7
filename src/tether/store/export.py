"""Export experience to a NumPy `.npz` archive (and read one back).

Why npz: numpy reads it with no extra dependency (`np.load(path)`, no pickle), and so can most
other tools; Parquet would need pyarrow. The export streams the table in chunks into memory-mapped
`.npy` files and zips them at the end, so memory stays bounded however big the table is, and the
archive appears atomically (temp file + rename).

Arrays in the archive (N rows, oldest first):

    id            int64   (N,)          row id in ml_experience_replay
    source_index  int32   (N,)          index into source_names
    source_names  <U      (S,)          distinct source keys
    episode       int64   (N,)
    step          int64   (N,)
    obs           dtype   (N, *obs_shape)     as stored (float32 for 28-D transitions)
    action        dtype   (N, *action_shape)
    reward        float32 (N,)
    next_obs      dtype   (N, *obs_shape)
    terminated    bool    (N,)
    truncated     bool    (N,)
    created_at    datetime64[us] (N,)  UTC

The per-row `extra` JSON is not exported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func, select

from tether.store.engine import StoreError
from tether.store.experience import EXP

if TYPE_CHECKING:
    from tether.algos.base import Transitions
    from tether.store.api import Store

EXPORT_FORMATS = ("npz",)
_REQUIRED = ("obs", "action", "reward", "next_obs", "terminated", "truncated")


@dataclass
class ExportSummary:
    path: Path
    rows: int
    sources: list[str]
    obs_shape: tuple[int, ...]
    obs_dtype: str
    action_shape: tuple[int, ...]
    action_dtype: str
    bytes: int


def export_npz(
    store: Store,
    out: str | Path,
    *,
    source: str | None = None,
    compress: bool = False,
    chunk_rows: int = 65536,
) -> ExportSummary:
    """Write the experience (of one `source`, or all when they share shapes) to `out` (.npz)."""
    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")  # np.savez would do the same; say it up front
    if not out.parent.exists():
        raise StoreError(f"The directory {out.parent} does not exist; create it or choose another --out.")
    until_id = store.experience.max_id(source)
    if until_id is None:
        which = f"for source {source!r}" if source else "in the store"
        raise StoreError(f"There is no experience {which} to export; check --source with tether store stats.")
    filters = [EXP.c.id <= until_id] + ([EXP.c.source == source] if source is not None else [])
    with store.read() as conn:
        total = int(conn.execute(select(func.count()).select_from(EXP).where(*filters)).scalar_one())
        names = [
            r[0] for r in conn.execute(select(EXP.c.source).where(*filters).distinct().order_by(EXP.c.source))
        ]
    index = {name: i for i, name in enumerate(names)}

    tmpdir = Path(tempfile.mkdtemp(prefix=".tether-export-", dir=out.parent))
    try:
        arrays: dict[str, np.ndarray] = {}
        filled = 0
        spec: tuple | None = None
        for chunk in store.experience.iter_chunks(source, chunk_rows=chunk_rows, until_id=until_id):
            t = chunk.transitions
            obs, next_obs = np.asarray(t.obs), np.asarray(t.next_obs)  # read-back rows: arrays
            chunk_spec = (obs.shape[1:], obs.dtype, t.action.shape[1:], t.action.dtype)
            if spec is None:
                spec = chunk_spec
                layout: dict[str, tuple[tuple[int, ...], Any]] = {
                    "id": ((), np.int64),
                    "source_index": ((), np.int32),
                    "episode": ((), np.int64),
                    "step": ((), np.int64),
                    "obs": (obs.shape[1:], obs.dtype),
                    "action": (t.action.shape[1:], t.action.dtype),
                    "reward": ((), np.float32),
                    "next_obs": (obs.shape[1:], obs.dtype),
                    "terminated": ((), np.bool_),
                    "truncated": ((), np.bool_),
                    "created_at": ((), np.dtype("datetime64[us]")),
                }
                for name, (shape, dtype) in layout.items():
                    arrays[name] = np.lib.format.open_memmap(
                        tmpdir / f"{name}.npy", mode="w+", dtype=dtype, shape=(total, *shape)
                    )
            elif chunk_spec != spec:
                raise StoreError(
                    "Sources in the store have different observation/action shapes; export one at a "
                    "time with --source KEY (see tether store stats)."
                )
            n = len(chunk)
            if filled + n > total:  # rows appeared below until_id (a concurrent writer's late commit)
                n = total - filled
            sl = slice(filled, filled + n)
            arrays["id"][sl] = chunk.ids[:n]
            arrays["source_index"][sl] = np.fromiter((index[s] for s in chunk.sources[:n]), np.int32, n)
            arrays["episode"][sl] = chunk.episodes[:n]
            arrays["step"][sl] = chunk.steps[:n]
            arrays["obs"][sl] = obs[:n]
            arrays["action"][sl] = t.action[:n]
            arrays["reward"][sl] = t.reward[:n]
            arrays["next_obs"][sl] = next_obs[:n]
            arrays["terminated"][sl] = t.terminated[:n]
            arrays["truncated"][sl] = t.truncated[:n]
            arrays["created_at"][sl] = np.array(
                [ts.replace(tzinfo=None) for ts in chunk.created_at[:n]], dtype="datetime64[us]"
            )
            filled += n
            if filled >= total:
                break
        if spec is None:
            raise StoreError("There is no experience to export; check --source with tether store stats.")
        arrays["source_names"] = np.array(names, dtype=str)
        tmp_out = tmpdir / "export.npz"
        mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(tmp_out, "w", compression=mode, allowZip64=True) as zf:
            for name, arr in arrays.items():
                part = arr if name == "source_names" else arr[:filled]
                with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, part, allow_pickle=False)
        arrays.clear()  # drop the memory maps before their files go
        os.replace(tmp_out, out)
        size = out.stat().st_size
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ExportSummary(
        path=out,
        rows=filled,
        sources=names,
        obs_shape=tuple(spec[0]),
        obs_dtype=spec[1].str,
        action_shape=tuple(spec[2]),
        action_dtype=spec[3].str,
        bytes=size,
    )


def read_npz(path: str | Path) -> tuple[Transitions, dict[str, np.ndarray]]:
    """Load an export: the transitions, and every array of the archive by name."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise StoreError(f"No file {path}; check the path.") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise StoreError(f"{path} is not a readable .npz archive ({exc}); re-export it.") from None
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise StoreError(
            f"{path} lacks the arrays {', '.join(missing)}; it is not a Tether experience export."
        )
    n = arrays["reward"].shape[0]
    if any(arrays[k].shape[:1] != (n,) for k in _REQUIRED):
        raise StoreError(f"{path} has arrays of different lengths; it is damaged, re-export it.")
    from tether.algos.base import Transitions

    batch = Transitions(
        obs=arrays["obs"],
        action=arrays["action"],
        reward=arrays["reward"],
        next_obs=arrays["next_obs"],
        terminated=arrays["terminated"].astype(bool),
        truncated=arrays["truncated"].astype(bool),
    )
    return batch, arrays
