"""`open_store()` and the `Store` facade the trainer, the CLI and the service use."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.exc import DBAPIError

from tether.store.engine import (
    StoreError,
    check_connection,
    create_store_engine,
    current_revision,
    describe_error,
    parse_url,
    resolve_url,
    safe_url,
    upgrade_schema,
)
from tether.store.experience import ExperienceRepo, OutcomeRepo
from tether.store.models import TABLES, Base
from tether.store.registry import ModelRegistry
from tether.store.runs import RunRepo
from tether.store.writer import BackgroundWriter, CommitCallback, ErrorCallback

log = logging.getLogger(__name__)


@dataclass
class StoreStats:
    backend: str  # "sqlite" | "postgresql"
    url: str  # password masked
    schema_revision: str | None
    experience_table: str  # "hypertable (TimescaleDB x.y)" | "plain table"
    timescaledb: bool
    rows: dict[str, int] = field(default_factory=dict)
    size_bytes: int | None = None
    server_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class Store:
    """One database: `runs`, `experience`, `outcomes`, `models`, plus `writer()` and `stats()`.

    Thread-safe: repositories hold no state and each call takes its own pooled connection.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.runs = RunRepo(self)
        self.experience = ExperienceRepo(self)
        self.outcomes = OutcomeRepo(self)
        self.models = ModelRegistry(self)
        self._writers: list[BackgroundWriter] = []

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    @property
    def url(self) -> str:
        return safe_url(self.engine.url)

    # -- connections -------------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reading (rolled back at the end)."""
        with self._errors(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write_tx(self) -> Iterator[Connection]:
        """A write transaction: committed on success, rolled back on error.

        On SQLite it starts with BEGIN IMMEDIATE, taking the single write lock up front (waiting up
        to 30 s for it) instead of failing halfway when another process writes too.
        """
        opts = {"tether_begin": "IMMEDIATE"} if self.backend == "sqlite" else {}
        with self._errors(), self.engine.connect().execution_options(**opts) as conn, conn.begin():
            yield conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except DBAPIError as exc:
            # Lost/refused connections become one sentence; statement errors keep their type.
            if exc.connection_invalidated or _is_connect_error(exc):
                raise describe_error(exc, self.engine.url) from None
            raise

    # -- background writing -------------------------------------------------------------------

    def writer(
        self,
        *,
        on_commit: CommitCallback | None = None,
        on_error: ErrorCallback | None = None,
        max_queue_rows: int = 262_144,
        max_batch_rows: int = 65_536,
        linger_s: float = 0.05,
        block_s: float = 0.05,
        before_commit: CommitCallback | None = None,
    ) -> BackgroundWriter:
        """A started `BackgroundWriter` (see `tether.store.writer` for its guarantees)."""
        w = BackgroundWriter(
            self,
            on_commit=on_commit,
            on_error=on_error,
            max_queue_rows=max_queue_rows,
            max_batch_rows=max_batch_rows,
            linger_s=linger_s,
            block_s=block_s,
            before_commit=before_commit,
        )
        self._writers.append(w)
        return w

    # -- status --------------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        """Row counts, schema revision, size, and whether experience is a TimescaleDB hypertable."""
        with self.read() as conn:
            rows = {
                name: int(
                    conn.execute(select(func.count()).select_from(Base.metadata.tables[name])).scalar_one()
                )
                for name in TABLES
            }
            revision = current_revision(conn)
            timescale_version: str | None = None
            hypertable = False
            size: int | None = None
            server: str | None = None
            if self.backend == "postgresql":
                server = conn.execute(text("SHOW server_version")).scalar()
                timescale_version = conn.execute(
                    text("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
                ).scalar()
                if timescale_version is not None:
                    hypertable = (
                        conn.execute(
                            text(
                                "SELECT 1 FROM timescaledb_information.hypertables "
                                "WHERE hypertable_name = 'ml_experience_replay' "
                                "AND hypertable_schema = current_schema()"
                            )
                        ).first()
                        is not None
                    )
                if hypertable:  # chunks live in TimescaleDB's own schema
                    size = int(
                        conn.execute(text("SELECT hypertable_size('ml_experience_replay')")).scalar() or 0
                    )
                else:
                    size = 0
                size += int(
                    conn.execute(
                        text(
                            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                            "JOIN pg_namespace n ON n.oid = c.relnamespace "
                            "WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname = ANY(:t)"
                        ),
                        {"t": [t for t in TABLES if not (hypertable and t == "ml_experience_replay")]},
                    ).scalar_one()
                )
            else:
                server = f"SQLite {sqlite3.sqlite_version}"
                db = self.engine.url.database
                if db and db != ":memory:":
                    size = sum(p.stat().st_size for p in (Path(db), Path(db + "-wal")) if p.exists())
        kind = f"hypertable (TimescaleDB {timescale_version})" if hypertable else "plain table"
        return StoreStats(
            backend=self.backend,
            url=self.url,
            schema_revision=revision,
            experience_table=kind,
            timescaledb=hypertable,
            rows=rows,
            size_bytes=size,
            server_version=server,
        )

    def close(self) -> None:
        """Close writers (flushing them) and the connection pool."""
        for w in self._writers:
            w.close()
        self._writers.clear()
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_connect_error(exc: DBAPIError) -> bool:
    low = str(exc.orig).lower()
    return any(
        s in low
        for s in (
            "connection refused",
            "could not connect",
            "connection failed",
            "server closed the connection",
        )
    )


def open_store(url: str | None = None, *, migrate: bool = True) -> Store:
    """Open (and by default create/upgrade) the store at `url`, `TETHER_DB`, or the default file.

    Raises `StoreError` with one sentence naming the fix for a malformed URL, an unsupported
    scheme, a missing driver, an unreachable server, a wrong database/user, or an unusable file.
    """
    parsed = parse_url(resolve_url(url))
    engine = create_store_engine(parsed)
    try:
        check_connection(engine)
        if migrate:
            upgrade_schema(engine)
    except StoreError:
        engine.dispose()
        raise
    except (DBAPIError, sqlite3.Error) as exc:
        engine.dispose()
        raise describe_error(exc, parsed) from None
    log.debug("Opened store %s", safe_url(parsed))
    return Store(engine)
