"""`tether serve`: the live service and dashboard; and the helper `tether train --serve` uses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tether.service.server import DEFAULT_HOST, DEFAULT_PORT, ServiceHandle

console = Console()

__all__ = ["ServiceHandle", "register", "serve", "start_service_for_trainer"]


def start_service_for_trainer(
    trainer: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None
) -> ServiceHandle:
    """Serve the dashboard and API for a trainer that its caller runs in the foreground.

    The service runs uvicorn in a daemon thread, reads `trainer.bus` and calls the trainer's
    thread-safe controls. Returns a handle with `url` and `stop()`; stopping the service leaves the
    trainer alone. Raises `ServiceError` (a `TetherError`) for a refused bind or a taken port.
    """
    from tether.service.app import create_app
    from tether.service.jobs import JobManager
    from tether.service.server import check_bind, start_in_thread

    check_bind(host, token)
    manager = JobManager(Path(trainer.run_dir).parent, bus=trainer.bus)
    manager.attach(trainer)
    app = create_app(manager, token=token, stop_jobs_on_shutdown=False)
    return start_in_thread(app, host=host, port=port, token=token)


def serve(
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (non-loopback needs a token).")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", help="Port to listen on.", min=0, max=65535)] = DEFAULT_PORT,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", envvar="TETHER_TOKEN", help="Bearer token for control, data and the WebSocket."
        ),
    ] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where runs are kept and found.")] = Path(
        "runs"
    ),
    preset: Annotated[
        str, typer.Option("--preset", help="The preset the dashboard's Start button uses.")
    ] = "lunabotics",
) -> None:
    """Serve the live dashboard and the REST/WebSocket API; jobs are started from the API or the dashboard."""
    from tether.config import ConfigError, preset_names
    from tether.service.app import create_app
    from tether.service.jobs import JobManager
    from tether.service.server import check_bind, serve_foreground

    check_bind(host, token)
    if preset not in preset_names():
        raise ConfigError(f"unknown preset '{preset}'; choose one of: {', '.join(preset_names())}.")
    manager = JobManager(runs_dir, default_preset=preset)
    app = create_app(manager, token=token)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"Dashboard: [bold]http://{shown}:{port}/[/]  (runs in {runs_dir}; Ctrl-C stops)")
    if token:
        console.print("A token is required for control, data and the WebSocket (Authorization: Bearer …).")
    serve_foreground(app, host=host, port=port, token=token)


def register(app: typer.Typer, sim_app: typer.Typer) -> None:
    app.command("serve")(serve)
