"""Initial store schema: runs, metrics, experience, episode outcomes, model registry.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01

On PostgreSQL with the TimescaleDB extension installed in the database, `ml_experience_replay`
becomes a hypertable partitioned on `created_at` (its primary key then includes `created_at`, as
TimescaleDB requires). Everything else is identical on every backend.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import BYTEA, JSONB

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

log = logging.getLogger("tether.store.migrations")

# Frozen copies of the column types (a migration must not change when models.py does).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(JSONB(), "postgresql")
Blob = sa.LargeBinary().with_variant(BYTEA(), "postgresql")
Ts = sa.DateTime(timezone=True)


def _timescaledb_installed() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    return (
        bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")).first() is not None
    )


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("preset", sa.String(200), nullable=True),
        sa.Column("algorithm", sa.String(64), nullable=True),
        sa.Column("env_id", sa.String(200), nullable=True),
        sa.Column("config", Json, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", Ts, nullable=False),
        sa.Column("finished_at", Ts, nullable=True),
        sa.Column("run_dir", sa.String(1024), nullable=True),
        sa.Column("summary", Json, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index("ix_runs_status", "runs", ["status"])
    op.create_index("ix_runs_started_at", "runs", ["started_at"])

    op.create_table(
        "metrics",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("time", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_metrics"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_metrics_run_id_runs", ondelete="CASCADE"),
    )
    op.create_index("ix_metrics_run_id_key_step", "metrics", ["run_id", "key", "step"])

    hypertable = _timescaledb_installed()
    # TimescaleDB requires the partitioning column in every unique constraint.
    pk_cols = ["id", "created_at"] if hypertable else ["id"]
    id_args = (sa.Identity(),) if hypertable else ()
    op.create_table(
        "ml_experience_replay",
        sa.Column("id", BigId, *id_args, autoincrement=True, nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("episode", sa.BigInteger(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("obs", Blob, nullable=False),
        sa.Column("next_obs", Blob, nullable=False),
        sa.Column("obs_shape", sa.String(64), nullable=False),
        sa.Column("obs_dtype", sa.String(8), nullable=False),
        sa.Column("action", Blob, nullable=False),
        sa.Column("action_shape", sa.String(64), nullable=False),
        sa.Column("action_dtype", sa.String(8), nullable=False),
        sa.Column("reward", sa.Double(), nullable=False),
        sa.Column("terminated", sa.Boolean(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("extra", Json, nullable=True),
        sa.PrimaryKeyConstraint(*pk_cols, name="pk_ml_experience_replay"),
    )
    op.create_index(
        "ix_ml_experience_replay_source_episode_step",
        "ml_experience_replay",
        ["source", "episode", "step"],
    )
    if hypertable:
        op.execute("SELECT create_hypertable('ml_experience_replay', 'created_at', if_not_exists => TRUE)")
        log.info("ml_experience_replay is a TimescaleDB hypertable")

    op.create_table(
        "ml_episode_outcomes",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(128), nullable=True),
        sa.Column("source", sa.String(200), nullable=True),
        sa.Column("episode", sa.BigInteger(), nullable=False),
        sa.Column("episode_return", sa.Double(), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=True),
        sa.Column("archetype", sa.String(64), nullable=True),
        sa.Column("tags", Json, nullable=True),
        sa.Column("created_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ml_episode_outcomes"),
    )
    op.create_index("ix_ml_episode_outcomes_run_id_episode", "ml_episode_outcomes", ["run_id", "episode"])
    op.create_index("ix_ml_episode_outcomes_source", "ml_episode_outcomes", ["source"])
    op.create_index("ix_ml_episode_outcomes_archetype", "ml_episode_outcomes", ["archetype"])

    op.create_table(
        "ml_models",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("algorithm", sa.String(64), nullable=True),
        sa.Column("archetype", sa.String(64), nullable=True),
        sa.Column("tags", Json, nullable=True),
        sa.Column("artifact_uri", sa.String(2048), nullable=False),
        sa.Column("artifact_format", sa.String(32), nullable=False),
        sa.Column("metrics", Json, nullable=True),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("parent_run_id", sa.String(128), nullable=True),
        sa.Column("created_at", Ts, nullable=False),
        sa.Column("updated_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ml_models"),
        sa.UniqueConstraint("name", "version", name="uq_ml_models_name_version"),
        sa.ForeignKeyConstraint(
            ["parent_run_id"], ["runs.id"], name="fk_ml_models_parent_run_id_runs", ondelete="SET NULL"
        ),
        sa.CheckConstraint("stage IN ('staging', 'production', 'archived')", name="ck_ml_models_stage"),
    )
    op.create_index("ix_ml_models_stage", "ml_models", ["stage"])
    op.create_index(
        "uq_ml_models_one_production",
        "ml_models",
        ["name"],
        unique=True,
        sqlite_where=sa.text("stage = 'production'"),
        postgresql_where=sa.text("stage = 'production'"),
    )


def downgrade() -> None:
    for table in ("ml_models", "ml_episode_outcomes", "ml_experience_replay", "metrics", "runs"):
        op.drop_table(table)
