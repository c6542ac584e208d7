"""`tether runs`, `tether models` and `tether store`: look into the store from the command line.

Every command takes `--db URL` (else `TETHER_DB`, else the SQLite file in the data directory).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tether.store import StoreError, open_store
from tether.store.export import EXPORT_FORMATS, export_npz
from tether.store.models import MODEL_STAGES, RUN_STATUSES
from tether.store.registry import ModelRecord, parse_ref
from tether.store.runs import RunRecord


def _console() -> Console:
    # Made per command so the terminal width (or $COLUMNS) is read when the command runs.
    return Console()


Db = Annotated[
    str | None,
    typer.Option(
        "--db", help="Database URL; default $TETHER_DB, else sqlite:///<$ML_DATA_DIR or ./data>/tether.db."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(_jsonable(value), indent=2, sort_keys=True))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _summary_text(summary: dict[str, Any] | None, limit: int = 3) -> str:
    if not summary:
        return ""
    items = list(summary.items())[:limit]
    more = " …" if len(summary) > limit else ""
    return ", ".join(f"{k}={_num(v)}" for k, v in items) + more


# ---------------------------------------------------------------------------------------------
# runs

runs_app = typer.Typer(
    help="Run history: what trained, with which config, how it went.", no_args_is_help=True
)


@runs_app.command("list")
def runs_list(
    db: Db = None,
    status: Annotated[
        str | None, typer.Option(help=f"Only runs with this status ({', '.join(RUN_STATUSES)}).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Only runs with this name.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many runs, newest first.")] = 20,
    as_json: AsJson = False,
) -> None:
    """List runs, newest first."""
    if status is not None and status not in RUN_STATUSES:
        raise StoreError(f"--status must be one of {', '.join(RUN_STATUSES)}; got {status!r}.")
    with open_store(db) as store:
        runs = store.runs.list(status=status, name=name, limit=limit)
    if as_json:
        _print_json([_run_dict(r, with_config=False) for r in runs])
        return
    table = Table(title=f"Runs ({len(runs)})")
    for col in ("id", "name", "algorithm", "env", "status", "started (UTC)", "finished (UTC)", "summary"):
        table.add_column(col, overflow="fold")
    for r in runs:
        table.add_row(
            r.id, r.name, r.algorithm or "-", r.env_id or "-", _status(r.status),
            _when(r.started_at), _when(r.finished_at), _summary_text(r.summary),
        )  # fmt: skip
    _console().print(table)


def _status(status: str) -> str:
    color = {"running": "cyan", "completed": "green", "failed": "red", "stopped": "yellow"}.get(
        status, "white"
    )
    return f"[{color}]{status}[/]"


def _run_dict(r: RunRecord, *, with_config: bool = True) -> dict[str, Any]:
    data = asdict(r)
    if not with_config:
        data.pop("config")
    return data


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="Run id (see tether runs list).")],
    db: Db = None,
    key: Annotated[
        str | None, typer.Option(help="Show the history of this metric instead of the latest values.")
    ] = None,
    last: Annotated[int, typer.Option(min=1, help="With --key: how many of the newest points.")] = 20,
    as_json: AsJson = False,
) -> None:
    """One run: its config, summary, latest metrics and episode outcomes."""
    with open_store(db) as store:
        run = store.runs.get(run_id)
        if run is None:
            raise StoreError(f"No run {run_id!r} in {store.url}; see tether runs list.")
        history = store.runs.metrics(run_id, key, limit=last) if key else None
        latest = store.runs.latest_metrics(run_id)
        n_metrics = store.runs.count_metrics(run_id)
        outcomes = store.outcomes.list(run_id=run_id, limit=1000)
        n_outcomes = store.outcomes.count(run_id)
        models = [m for m in store.models.list(limit=10_000) if m.parent_run_id == run_id]
    returns = [o.episode_return for o in outcomes]
    successes = [o.success for o in outcomes if o.success is not None]
    outcome_summary = {
        "episodes": n_outcomes,
        "recent_return_mean": sum(returns) / len(returns) if returns else None,
        "recent_success_rate": sum(successes) / len(successes) if successes else None,
    }
    if as_json:
        data = _run_dict(run)
        data["latest_metrics"] = {k: {"step": p.step, "value": p.value} for k, p in latest.items()}
        data["metric_rows"] = n_metrics
        data["outcomes"] = outcome_summary
        data["models"] = [m.ref for m in models]
        if history is not None:
            data["history"] = [{"step": p.step, "value": p.value, "time": p.time} for p in history]
        _print_json(data)
        return
    info = Table(title=f"Run {run.id}", show_header=False)
    info.add_column("field", style="bold")
    info.add_column("value", overflow="fold")
    for label, value in (
        ("name", run.name), ("status", _status(run.status)), ("preset", run.preset or "-"),
        ("algorithm", run.algorithm or "-"), ("env", run.env_id or "-"), ("run dir", run.run_dir or "-"),
        ("started (UTC)", _when(run.started_at)), ("finished (UTC)", _when(run.finished_at)),
        ("summary", json.dumps(_jsonable(run.summary)) if run.summary else "-"),
        ("metric rows", str(n_metrics)), ("episodes", str(n_outcomes)),
        ("models", ", ".join(m.ref for m in models) or "-"),
    ):  # fmt: skip
        info.add_row(label, value)
    if outcome_summary["recent_return_mean"] is not None:
        info.add_row("return (last ≤1000)", _num(outcome_summary["recent_return_mean"]))
    _console().print(info)
    if history is not None:
        table = Table(title=f"{key} (newest {len(history)})")
        table.add_column("step", justify="right")
        table.add_column("value", justify="right")
        table.add_column("time (UTC)")
        for p in history:
            table.add_row(str(p.step), _num(p.value), _when(p.time))
        _console().print(table)
    elif latest:
        table = Table(title="Latest metrics")
        table.add_column("key")
        table.add_column("step", justify="right")
        table.add_column("value", justify="right")
        for k, p in latest.items():
            table.add_row(k, str(p.step), _num(p.value))
        _console().print(table)


# ---------------------------------------------------------------------------------------------
# models

models_app = typer.Typer(help="The model registry: versions, stages, artifacts.", no_args_is_help=True)


def _model_table(models: list[ModelRecord], title: str) -> Table:
    table = Table(title=title)
    for col in ("name", "version", "stage", "algorithm", "archetype", "format", "artifact", "created (UTC)"):
        table.add_column(col, overflow="fold")
    stage_color = {"production": "green", "staging": "cyan", "archived": "dim"}
    for m in models:
        table.add_row(
            m.name, str(m.version), f"[{stage_color[m.stage]}]{m.stage}[/]", m.algorithm or "-",
            m.archetype or "-", m.artifact_format, m.artifact_uri, _when(m.created_at),
        )  # fmt: skip
    return table


@models_app.command("list")
def models_list(
    db: Db = None,
    name: Annotated[str | None, typer.Option(help="Only versions of this model name.")] = None,
    stage: Annotated[str | None, typer.Option(help=f"Only this stage ({', '.join(MODEL_STAGES)}).")] = None,
    as_json: AsJson = False,
) -> None:
    """List model versions by name, newest version first."""
    with open_store(db) as store:
        models = store.models.list(name=name, stage=stage)
    if as_json:
        _print_json(models)
        return
    _console().print(_model_table(models, f"Models ({len(models)})"))


@models_app.command("show")
def models_show(
    ref: Annotated[
        str,
        typer.Argument(metavar="NAME[@VERSION|@STAGE]", help="e.g. monster, monster@3, monster@production"),
    ],
    db: Db = None,
    as_json: AsJson = False,
) -> None:
    """One model version (the newest when no version is given)."""
    name, version, stage = parse_ref(ref)
    with open_store(db) as store:
        model = store.models.get(name, version, stage=stage)
        url = store.url
    if model is None:
        raise StoreError(f"No model {ref!r} in {url}; see tether models list.")
    if as_json:
        _print_json(model)
        return
    info = Table(title=f"Model {model.ref}", show_header=False)
    info.add_column("field", style="bold")
    info.add_column("value", overflow="fold")
    for label, value in (
        ("stage", model.stage), ("algorithm", model.algorithm or "-"), ("archetype", model.archetype or "-"),
        ("tags", ", ".join(model.tags or []) or "-"), ("format", model.artifact_format),
        ("artifact", model.artifact_uri), ("parent run", model.parent_run_id or "-"),
        ("metrics", json.dumps(model.metrics) if model.metrics else "-"),
        ("created (UTC)", _when(model.created_at)), ("updated (UTC)", _when(model.updated_at)),
    ):  # fmt: skip
        info.add_row(label, value)
    _console().print(info)


@models_app.command("register")
def models_register(
    name: Annotated[str, typer.Argument(help="Model name, e.g. monster_tank_combat.")],
    artifact: Annotated[str, typer.Argument(help="Path or URI of the artifact (ONNX, TFLite, ...).")],
    db: Db = None,
    artifact_format: Annotated[
        str | None, typer.Option("--format", help="Artifact format; default from the suffix.")
    ] = None,
    version: Annotated[int | None, typer.Option(min=1, help="Version number; default the next one.")] = None,
    algorithm: Annotated[str | None, typer.Option(help="Algorithm that trained it, e.g. ppo.")] = None,
    archetype: Annotated[str | None, typer.Option(help="Archetype (Monster AI), e.g. tank.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="A tag; repeat for more.")] = None,
    run: Annotated[str | None, typer.Option(help="Id of the run that produced it.")] = None,
    as_json: AsJson = False,
) -> None:
    """Register a new model version in staging."""
    with open_store(db) as store:
        model = store.models.register(
            name, artifact, artifact_format=artifact_format, version=version, algorithm=algorithm,
            archetype=archetype, tags=tag, parent_run_id=run,
        )  # fmt: skip
    if as_json:
        _print_json(model)
    else:
        _console().print(f"Registered [bold]{model.ref}[/] ({model.artifact_format}) in staging.")


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(min=1, help="Version to put in production.")],
    db: Db = None,
) -> None:
    """Put a version in production; the previous production version is archived."""
    with open_store(db) as store:
        before = store.models.production(name)
        model = store.models.promote(name, version)
    note = f" ({before.ref} archived)" if before is not None and before.version != version else ""
    _console().print(f"[green]{model.ref}[/] is now in production{note}.")


@models_app.command("archive")
def models_archive(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(min=1, help="Version to archive.")],
    db: Db = None,
) -> None:
    """Archive a version (archiving the production version leaves the name without one)."""
    with open_store(db) as store:
        model = store.models.archive(name, version)
    _console().print(f"{model.ref} is archived.")


# ---------------------------------------------------------------------------------------------
# store

store_app = typer.Typer(help="The experience store itself: size, tables, export.", no_args_is_help=True)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


@store_app.command("stats")
def store_stats(
    db: Db = None,
    sources: Annotated[
        bool, typer.Option("--sources", help="Also count experience rows per source (full scan).")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Backend, schema revision, row counts, size, and whether experience is a hypertable."""
    with open_store(db) as store:
        stats = store.stats()
        per_source = store.experience.sources() if sources else None
    if as_json:
        data = stats.as_dict()
        if per_source is not None:
            data["sources"] = {s.source: s.rows for s in per_source}
        _print_json(data)
        return
    info = Table(title="Store", show_header=False)
    info.add_column("field", style="bold")
    info.add_column("value", overflow="fold")
    info.add_row("url", stats.url)
    info.add_row("backend", f"{stats.backend} ({stats.server_version})")
    info.add_row("schema revision", stats.schema_revision or "-")
    info.add_row("ml_experience_replay", stats.experience_table)
    info.add_row("size", _size(stats.size_bytes))
    _console().print(info)
    rows = Table(title="Rows")
    rows.add_column("table")
    rows.add_column("rows", justify="right")
    for name, count in stats.rows.items():
        rows.add_row(name, f"{count:,}")
    _console().print(rows)
    if per_source is not None:
        table = Table(title="Experience by source")
        table.add_column("source")
        table.add_column("rows", justify="right")
        for s in per_source:
            table.add_row(s.source, f"{s.rows:,}")
        _console().print(table)


@store_app.command("export")
def store_export(
    out: Annotated[Path, typer.Option("--out", help="Output file (.npz).")],
    db: Db = None,
    fmt: Annotated[
        str, typer.Option("--format", help="Export format: npz (numpy; see docs/store.md).")
    ] = "npz",
    source: Annotated[
        str | None, typer.Option(help="Only this source key (needed when sources differ in shape).")
    ] = None,
    compress: Annotated[bool, typer.Option(help="Deflate the archive (smaller, slower).")] = False,
) -> None:
    """Export experience to a file that numpy reads back with np.load (no pickle)."""
    if fmt not in EXPORT_FORMATS:
        hint = " (parquet would need pyarrow; npz needs nothing extra)" if fmt == "parquet" else ""
        raise StoreError(f"Export format {fmt!r} is not supported{hint}; use --format npz.")
    with open_store(db) as store:
        summary = export_npz(store, out, source=source, compress=compress)
    _console().print(
        f"Exported {summary.rows:,} transitions from {len(summary.sources)} source(s) to "
        f"[bold]{summary.path}[/] ({_size(summary.bytes)}; "
        f"obs {list(summary.obs_shape)} {summary.obs_dtype}, "
        f"action {list(summary.action_shape)} {summary.action_dtype})."
    )


def register(app: typer.Typer, sim_app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
    app.add_typer(models_app, name="models")
    app.add_typer(store_app, name="store")
