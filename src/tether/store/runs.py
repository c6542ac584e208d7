"""Run history: `runs` (one row per job) and `metrics` (one row per scalar per logged step)."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from numbers import Real
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from tether.store._util import as_utc, check_json, check_name, metric_value, utcnow
from tether.store.engine import StoreError
from tether.store.models import RUN_STATUSES, Base, Metric, Run

if TYPE_CHECKING:
    from tether.store.api import Store

log = logging.getLogger(__name__)

RUNS = Base.metadata.tables[Run.__tablename__]
METRICS = Base.metadata.tables[Metric.__tablename__]


@dataclass
class RunRecord:
    id: str
    name: str
    status: str
    started_at: datetime
    finished_at: datetime | None = None
    preset: str | None = None
    algorithm: str | None = None
    env_id: str | None = None
    config: dict[str, Any] | None = None
    run_dir: str | None = None
    summary: dict[str, Any] | None = None


@dataclass
class MetricPoint:
    step: int
    key: str
    value: float  # NaN where the stored value is NULL
    time: datetime


def _record(row: Any) -> RunRecord:
    return RunRecord(
        id=row.id,
        name=row.name,
        status=row.status,
        started_at=as_utc(row.started_at),  # type: ignore[arg-type]
        finished_at=as_utc(row.finished_at),
        preset=row.preset,
        algorithm=row.algorithm,
        env_id=row.env_id,
        config=row.config,
        run_dir=row.run_dir,
        summary=row.summary,
    )


def metric_rows(run_id: str, step: int, values: Mapping[str, Any], when: datetime) -> list[dict[str, Any]]:
    """Rows for `metrics`; non-numeric values are skipped (a metrics dict may carry labels)."""
    check_name(run_id, "run id", max_len=128)
    if isinstance(step, bool) or not isinstance(step, int | Real) or int(step) != step:
        raise StoreError(f"The metrics step must be an integer; got {step!r}.")
    rows = []
    for key, value in values.items():
        if not isinstance(key, str) or not key or len(key) > 200:
            raise StoreError(f"Metric keys must be non-empty strings of at most 200 characters; got {key!r}.")
        if isinstance(value, bool) or not isinstance(value, Real | int | float):
            if hasattr(value, "item") and getattr(value, "size", 1) == 1:
                value = value.item()  # numpy / torch scalars
            if isinstance(value, bool) or not isinstance(value, Real):
                log.debug("Skipping non-numeric metric %s=%r", key, value)
                continue
        rows.append(
            {"run_id": run_id, "step": int(step), "key": key, "value": metric_value(value), "time": when}
        )
    return rows


def insert_metrics(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    try:
        conn.execute(insert(METRICS), rows)
    except IntegrityError:
        run_id = rows[0]["run_id"]
        raise StoreError(
            f"No run {run_id!r} in the store; call store.runs.start() before logging metrics."
        ) from None


class RunRepo:
    """`store.runs`: start, log metrics, finish, list, show."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def start(
        self,
        name: str,
        *,
        run_id: str | None = None,
        preset: str | None = None,
        algorithm: str | None = None,
        env_id: str | None = None,
        config: Mapping[str, Any] | None = None,
        run_dir: str | None = None,
    ) -> str:
        """Record a run as `running` and return its id (generated from the name unless given).

        Starting an id that exists resumes it: status back to `running`, `finished_at` cleared, and
        any given config/run_dir/preset/algorithm/env updated; `started_at` is kept.
        """
        check_name(name, "run name")
        now = utcnow()
        if run_id is None:
            run_id = f"{name[:80]}-{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        check_name(run_id, "run id", max_len=128)
        cfg = check_json(dict(config), "run config") if config is not None else None
        values: dict[str, Any] = {
            "name": name,
            "preset": preset,
            "algorithm": algorithm,
            "env_id": env_id,
            "config": cfg,
            "run_dir": str(run_dir) if run_dir is not None else None,
        }
        with self._store.write_tx() as conn:
            exists = conn.execute(select(RUNS.c.id).where(RUNS.c.id == run_id)).first()
            if exists:
                changes = {k: v for k, v in values.items() if v is not None}
                conn.execute(
                    update(RUNS)
                    .where(RUNS.c.id == run_id)
                    .values(status="running", finished_at=None, **changes)
                )
                log.info("Resumed run %s", run_id)
            else:
                conn.execute(insert(RUNS).values(id=run_id, status="running", started_at=now, **values))
        return run_id

    def log_metrics(self, run_id: str, step: int, values: Mapping[str, Any]) -> int:
        """Append one step's scalars (synchronously); returns how many were stored."""
        rows = metric_rows(run_id, step, values, utcnow())
        with self._store.write_tx() as conn:
            insert_metrics(conn, rows)
        return len(rows)

    def finish(
        self, run_id: str, status: str = "completed", summary: Mapping[str, Any] | None = None
    ) -> None:
        """Mark a run `completed`, `failed` or `stopped`, with its summary metrics."""
        if status not in RUN_STATUSES or status == "running":
            raise StoreError(f"Run status must be one of completed, failed, stopped; got {status!r}.")
        summ = check_json(_finite(dict(summary)), "run summary") if summary is not None else None
        with self._store.write_tx() as conn:
            values: dict[str, Any] = {"status": status, "finished_at": utcnow()}
            if summ is not None:
                values["summary"] = summ
            result = conn.execute(update(RUNS).where(RUNS.c.id == run_id).values(**values))
            if result.rowcount == 0:
                raise StoreError(f"No run {run_id!r} in the store; see tether runs list.")

    def get(self, run_id: str) -> RunRecord | None:
        with self._store.read() as conn:
            row = conn.execute(select(RUNS).where(RUNS.c.id == run_id)).first()
        return _record(row) if row else None

    def metrics(self, run_id: str, key: str | None = None, *, limit: int | None = None) -> list[MetricPoint]:
        """History in step order (the last `limit` points when given)."""
        stmt = select(METRICS.c.step, METRICS.c.key, METRICS.c.value, METRICS.c.time).where(
            METRICS.c.run_id == run_id
        )
        if key is not None:
            stmt = stmt.where(METRICS.c.key == key)
        if limit is not None:
            stmt = stmt.order_by(METRICS.c.step.desc(), METRICS.c.id.desc()).limit(limit)
        else:
            stmt = stmt.order_by(METRICS.c.step, METRICS.c.id)
        with self._store.read() as conn:
            rows = list(conn.execute(stmt).all())
        if limit is not None:
            rows.reverse()
        return [_point(r) for r in rows]

    def latest_metrics(self, run_id: str) -> dict[str, MetricPoint]:
        """The value at the highest step of each key."""
        inner = (
            select(METRICS.c.key, func.max(METRICS.c.step).label("step"))
            .where(METRICS.c.run_id == run_id)
            .group_by(METRICS.c.key)
            .subquery()
        )
        stmt = (
            select(METRICS.c.step, METRICS.c.key, METRICS.c.value, METRICS.c.time)
            .join(inner, and_(METRICS.c.key == inner.c.key, METRICS.c.step == inner.c.step))
            .where(METRICS.c.run_id == run_id)
            .order_by(METRICS.c.key, METRICS.c.id)
        )
        with self._store.read() as conn:
            return {r.key: _point(r) for r in conn.execute(stmt)}

    def count_metrics(self, run_id: str) -> int:
        with self._store.read() as conn:
            stmt = select(func.count()).select_from(METRICS).where(METRICS.c.run_id == run_id)
            return int(conn.execute(stmt).scalar_one())

    def list(self, *, status: str | None = None, name: str | None = None, limit: int = 50) -> list[RunRecord]:
        """Newest first."""
        stmt = select(RUNS).order_by(RUNS.c.started_at.desc(), RUNS.c.id.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(RUNS.c.status == status)
        if name is not None:
            stmt = stmt.where(RUNS.c.name == name)
        with self._store.read() as conn:
            return [_record(r) for r in conn.execute(stmt)]


def _point(row: Any) -> MetricPoint:
    return MetricPoint(
        step=int(row.step),
        key=row.key,
        value=math.nan if row.value is None else float(row.value),
        time=as_utc(row.time),  # type: ignore[arg-type]
    )


def _finite(summary: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf; a summary keeps them as null so a diverged run can still finish."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        elif hasattr(value, "item") and getattr(value, "size", 1) == 1:
            value = value.item()
            if isinstance(value, float) and not math.isfinite(value):
                value = None
        out[key] = value
    return out
