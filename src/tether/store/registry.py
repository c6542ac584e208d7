"""The model registry (`ml_models`): versioned artifacts with a staging → production → archived life.

Invariant (enforced by a partial unique index, so other programs can rely on it too): at most one
version of a name is in `production`. Promoting a version archives the previous production
version of that name in the same transaction.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from tether.store._util import as_utc, check_json, check_name, utcnow
from tether.store.engine import StoreError
from tether.store.models import MODEL_STAGES, Base, ModelVersion

if TYPE_CHECKING:
    from tether.store.api import Store

log = logging.getLogger(__name__)

MODELS = Base.metadata.tables[ModelVersion.__tablename__]
_FORMAT_RE = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,31}$")
_FORMATS_BY_SUFFIX = {
    ".onnx": "onnx",
    ".tflite": "tflite",
    ".rknn": "rknn",
    ".pt": "torch",
    ".pth": "torch",
    ".safetensors": "safetensors",
    ".npz": "npz",
    ".json": "json",
}
_MAX_VERSION = 2**31 - 1
_LOCK_NAMESPACE = 0x7E7E  # first key of our PostgreSQL advisory locks


def _lock_name(conn: Connection, name: str) -> None:
    """Serialise registry writes for one model name (SQLite's BEGIN IMMEDIATE already does)."""
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big", signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"), {"ns": _LOCK_NAMESPACE, "key": key})


@dataclass
class ModelRecord:
    id: int
    name: str
    version: int
    stage: str
    artifact_uri: str
    artifact_format: str
    algorithm: str | None
    archetype: str | None
    tags: list[str] | None
    metrics: dict[str, Any] | None
    parent_run_id: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def _record(row: Any) -> ModelRecord:
    return ModelRecord(
        id=row.id,
        name=row.name,
        version=row.version,
        stage=row.stage,
        artifact_uri=row.artifact_uri,
        artifact_format=row.artifact_format,
        algorithm=row.algorithm,
        archetype=row.archetype,
        tags=row.tags,
        metrics=row.metrics,
        parent_run_id=row.parent_run_id,
        created_at=as_utc(row.created_at),  # type: ignore[arg-type]
        updated_at=as_utc(row.updated_at),  # type: ignore[arg-type]
    )


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= _MAX_VERSION:
        raise StoreError(f"A model version is a positive integer; got {version!r}.")
    return version


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """`NAME`, `NAME@VERSION` or `NAME@STAGE` -> (name, version, stage)."""
    name, sep, tail = ref.partition("@")
    check_name(name, "model name", allow_at=False)
    if not sep:
        return name, None, None
    if tail in MODEL_STAGES:
        return name, None, tail
    if tail.isdigit():
        return name, _check_version(int(tail)), None
    raise StoreError(
        f"{ref!r} is not NAME, NAME@VERSION or NAME@STAGE (stage one of {', '.join(MODEL_STAGES)})."
    )


def _artifact(uri: str | Path) -> str:
    text = str(uri)
    if not text.strip() or len(text) > 2048:
        raise StoreError("The model artifact must be a path or URI of 1 to 2048 characters.")
    if "://" in text:
        return text
    # A relative path means nothing to another process or machine; record where it really is.
    return str(Path(text).expanduser().resolve())


class ModelRegistry:
    """`store.models`: register, promote, archive and find model versions."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def register(
        self,
        name: str,
        artifact: str | Path,
        *,
        artifact_format: str | None = None,
        version: int | None = None,
        algorithm: str | None = None,
        archetype: str | None = None,
        tags: Sequence[str] | None = None,
        metrics: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> ModelRecord:
        """Add a version in `staging`; without `version` it takes the next number for the name."""
        check_name(name, "model name", allow_at=False)
        uri = _artifact(artifact)
        fmt = artifact_format or _FORMATS_BY_SUFFIX.get(Path(uri.split("?")[0]).suffix.lower())
        if fmt is None:
            raise StoreError(
                f"Cannot tell the format of {uri!r} from its suffix; "
                "pass artifact_format (e.g. onnx, tflite, torch)."
            )
        if not _FORMAT_RE.match(fmt):
            raise StoreError(
                f"Artifact format {fmt!r} must be a short lowercase word such as onnx or tflite."
            )
        if version is not None:
            _check_version(version)
        if tags is not None and (isinstance(tags, str) or not all(isinstance(t, str) for t in tags)):
            raise StoreError(f"Model tags must be a list of strings; got {tags!r}.")
        if archetype is not None:
            check_name(archetype, "archetype", max_len=64)
        if algorithm is not None:
            check_name(algorithm, "algorithm", max_len=64)
        values = {
            "name": name,
            "algorithm": algorithm,
            "archetype": archetype,
            "tags": list(tags) if tags is not None else None,
            "artifact_uri": uri,
            "artifact_format": fmt,
            "metrics": check_json(dict(metrics), "model metrics") if metrics is not None else None,
            "stage": "staging",
            "parent_run_id": parent_run_id,
        }
        for _attempt in range(5):
            now = utcnow()
            try:
                with self._store.write_tx() as conn:
                    _lock_name(conn, name)
                    if parent_run_id is not None:
                        self._check_run(conn, parent_run_id)
                    number = version
                    if number is None:
                        top = conn.execute(
                            select(func.max(MODELS.c.version)).where(MODELS.c.name == name)
                        ).scalar()
                        number = (top or 0) + 1
                    conn.execute(
                        insert(MODELS).values(version=number, created_at=now, updated_at=now, **values)
                    )
                    row = conn.execute(
                        select(MODELS).where(MODELS.c.name == name, MODELS.c.version == number)
                    ).one()
                log.debug("Registered model %s@%d (%s)", name, number, fmt)
                return _record(row)
            except IntegrityError:
                if version is not None:
                    raise StoreError(
                        f"Model {name}@{version} already exists; "
                        "pick another version or omit it to take the next."
                    ) from None
                # Another process took the same next number between our read and insert; retry.
        raise StoreError(f"Could not allocate a version for model {name!r} under heavy contention; retry.")

    @staticmethod
    def _check_run(conn: Connection, run_id: str) -> None:
        from tether.store.runs import RUNS

        if conn.execute(select(RUNS.c.id).where(RUNS.c.id == run_id)).first() is None:
            raise StoreError(
                f"No run {run_id!r} in the store to be this model's parent; see tether runs list."
            )

    def _locked(self, conn: Connection, name: str, version: int) -> Any:
        # Lock the name and its rows (row locks also hold off other programs' writers), so
        # concurrent promotions of one name run one at a time.
        _lock_name(conn, name)
        rows = conn.execute(select(MODELS).where(MODELS.c.name == name).with_for_update()).all()
        for row in rows:
            if row.version == version:
                return row
        raise StoreError(f"No model {name}@{version} in the registry; see tether models list.")

    def promote(self, name: str, version: int) -> ModelRecord:
        """Make `name@version` the production version; the previous one becomes `archived`."""
        _check_version(version)
        with self._store.write_tx() as conn:
            self._locked(conn, name, version)
            now = utcnow()
            previous = conn.execute(
                update(MODELS)
                .where(MODELS.c.name == name, MODELS.c.stage == "production", MODELS.c.version != version)
                .values(stage="archived", updated_at=now)
            ).rowcount
            conn.execute(
                update(MODELS)
                .where(MODELS.c.name == name, MODELS.c.version == version)
                .values(stage="production", updated_at=now)
            )
            row = conn.execute(select(MODELS).where(MODELS.c.name == name, MODELS.c.version == version)).one()
        log.debug("Promoted %s@%d to production (%d archived)", name, version, previous)
        return _record(row)

    def archive(self, name: str, version: int) -> ModelRecord:
        """Retire a version (a production version leaves the name with no production model)."""
        return self._set_stage(name, version, "archived")

    def stage(self, name: str, version: int) -> ModelRecord:
        """Move a version back to `staging`."""
        return self._set_stage(name, version, "staging")

    def _set_stage(self, name: str, version: int, stage: str) -> ModelRecord:
        _check_version(version)
        with self._store.write_tx() as conn:
            self._locked(conn, name, version)
            conn.execute(
                update(MODELS)
                .where(MODELS.c.name == name, MODELS.c.version == version)
                .values(stage=stage, updated_at=utcnow())
            )
            row = conn.execute(select(MODELS).where(MODELS.c.name == name, MODELS.c.version == version)).one()
        return _record(row)

    def get(self, name: str, version: int | None = None, *, stage: str | None = None) -> ModelRecord | None:
        """One version: exact `version`, else the newest in `stage`, else the newest of the name."""
        if stage is not None and stage not in MODEL_STAGES:
            raise StoreError(f"Model stage must be one of {', '.join(MODEL_STAGES)}; got {stage!r}.")
        stmt = select(MODELS).where(MODELS.c.name == name)
        if version is not None:
            stmt = stmt.where(MODELS.c.version == _check_version(version))
        if stage is not None:
            stmt = stmt.where(MODELS.c.stage == stage)
        with self._store.read() as conn:
            row = conn.execute(stmt.order_by(MODELS.c.version.desc()).limit(1)).first()
        return _record(row) if row else None

    def production(self, name: str) -> ModelRecord | None:
        return self.get(name, stage="production")

    def list(
        self, *, name: str | None = None, stage: str | None = None, limit: int = 200
    ) -> list[ModelRecord]:
        """By name, newest version first."""
        if stage is not None and stage not in MODEL_STAGES:
            raise StoreError(f"Model stage must be one of {', '.join(MODEL_STAGES)}; got {stage!r}.")
        stmt = select(MODELS).order_by(MODELS.c.name, MODELS.c.version.desc()).limit(limit)
        if name is not None:
            stmt = stmt.where(MODELS.c.name == name)
        if stage is not None:
            stmt = stmt.where(MODELS.c.stage == stage)
        with self._store.read() as conn:
            return [_record(r) for r in conn.execute(stmt)]
