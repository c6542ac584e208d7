"""The store's tables as SQLAlchemy 2.x declarative models.

These classes are the schema's single description for the repositories; the Alembic migrations in
`migrations/versions/` create exactly these tables (plus, on TimescaleDB, a hypertable for
`ml_experience_replay`). Table and column names are plain snake_case without reserved words so
that other programs (for example a game server sharing the database) can read them with plain SQL.

Arrays (observations, actions) are stored as raw little-endian bytes, C order, with their per-row
shape as a JSON array text (``[28]``, ``[3,64,64]``, ``[]`` for a scalar) and numpy dtype string
(``<f4``, ``|u1``, ``<i8``) beside them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import BYTEA, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint names that are the same on every backend, so migrations can refer to them.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}

# BIGINT ids on PostgreSQL; on SQLite only `INTEGER PRIMARY KEY` is the auto-numbered rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")
Blob = LargeBinary().with_variant(BYTEA(), "postgresql")
Timestamp = DateTime(timezone=True)

RUN_STATUSES = ("running", "completed", "failed", "stopped")
MODEL_STAGES = ("staging", "production", "archived")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Run(Base):
    """One training job: what ran, with which config, and how it ended."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    preset: Mapped[str | None] = mapped_column(String(200))
    algorithm: Mapped[str | None] = mapped_column(String(64))
    env_id: Mapped[str | None] = mapped_column(String(200))
    config: Mapped[dict[str, Any] | None] = mapped_column(Json)
    status: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    run_dir: Mapped[str | None] = mapped_column(String(1024))
    summary: Mapped[dict[str, Any] | None] = mapped_column(Json)


class Metric(Base):
    """One scalar of a run's history: (run, step, key) -> value. NULL value means NaN."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_run_id_key_step", "run_id", "key", "step"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(128), ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    key: Mapped[str] = mapped_column(String(200))
    value: Mapped[float | None] = mapped_column(Double)
    time: Mapped[datetime] = mapped_column(Timestamp)


class Experience(Base):
    """One transition (s, a, r, s', terminated, truncated) from one source (model key / device)."""

    __tablename__ = "ml_experience_replay"
    __table_args__ = (Index("ix_ml_experience_replay_source_episode_step", "source", "episode", "step"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(200))
    episode: Mapped[int] = mapped_column(BigInteger)
    step: Mapped[int] = mapped_column(BigInteger)
    obs: Mapped[bytes] = mapped_column(Blob)
    next_obs: Mapped[bytes] = mapped_column(Blob)
    obs_shape: Mapped[str] = mapped_column(String(64))
    obs_dtype: Mapped[str] = mapped_column(String(8))
    action: Mapped[bytes] = mapped_column(Blob)
    action_shape: Mapped[str] = mapped_column(String(64))
    action_dtype: Mapped[str] = mapped_column(String(8))
    reward: Mapped[float] = mapped_column(Double)
    terminated: Mapped[bool] = mapped_column(Boolean)
    truncated: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    extra: Mapped[dict[str, Any] | None] = mapped_column(Json)


class EpisodeOutcome(Base):
    """How one episode ended: return, length, success, and who played it."""

    __tablename__ = "ml_episode_outcomes"
    __table_args__ = (Index("ix_ml_episode_outcomes_run_id_episode", "run_id", "episode"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str | None] = mapped_column(String(128))
    source: Mapped[str | None] = mapped_column(String(200), index=True)
    episode: Mapped[int] = mapped_column(BigInteger)
    episode_return: Mapped[float] = mapped_column(Double)
    length: Mapped[int] = mapped_column(BigInteger)
    success: Mapped[bool | None] = mapped_column(Boolean)
    archetype: Mapped[str | None] = mapped_column(String(64), index=True)
    tags: Mapped[list[str] | None] = mapped_column(Json)
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class ModelVersion(Base):
    """One registered policy artifact. At most one version per name is in `production`."""

    __tablename__ = "ml_models"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_ml_models_name_version"),
        CheckConstraint("stage IN ('staging', 'production', 'archived')", name="stage"),
        # The database itself guarantees a single production version per name, so a game server
        # reading `WHERE name = ? AND stage = 'production'` never sees two.
        Index(
            "uq_ml_models_one_production",
            "name",
            unique=True,
            sqlite_where=text("stage = 'production'"),
            postgresql_where=text("stage = 'production'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    algorithm: Mapped[str | None] = mapped_column(String(64))
    archetype: Mapped[str | None] = mapped_column(String(64))
    tags: Mapped[list[str] | None] = mapped_column(Json)
    artifact_uri: Mapped[str] = mapped_column(String(2048))
    artifact_format: Mapped[str] = mapped_column(String(32))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(Json)
    stage: Mapped[str] = mapped_column(String(16), index=True)
    parent_run_id: Mapped[str | None] = mapped_column(String(128), ForeignKey("runs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)


# The order a fresh database is created in (foreign keys point backwards).
TABLES = ("runs", "metrics", "ml_experience_replay", "ml_episode_outcomes", "ml_models")
