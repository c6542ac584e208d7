"""REST endpoints: health, metrics, control, runs and config."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request

from tether.config import preset_names
from tether.metrics import METRICS_UPDATE
from tether.service.auth import TokenAuth
from tether.service.jobs import JobManager
from tether.service.models import (
    ConfigOut,
    ConfigPatch,
    ConfigPatchOut,
    ErrorOut,
    HealthOut,
    MetricsOut,
    PresetsOut,
    RunDetail,
    RunsOut,
    SaveOut,
    StartOut,
    StartRequest,
    StopOut,
    ValidationErrorOut,
)

_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing or wrong token"}
}
_BAD_INPUT: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "a config or preset the server refused"},
    413: {"model": ErrorOut, "description": "request body too large"},
    422: {"model": ValidationErrorOut, "description": "malformed request"},
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "no job running / job already running"}
}


def build_router(manager: JobManager, auth: TokenAuth) -> APIRouter:
    from tether import __version__

    started = time.time()

    def require_token(request: Request) -> None:
        auth.check_request(request)

    guarded = [Depends(require_token)]
    # Every route documents our 422 body ({"detail": str, "errors": [...]}) instead of FastAPI's default.
    router = APIRouter(responses={422: _BAD_INPUT[422]})

    @router.get("/health", response_model=HealthOut, tags=["service"])
    def health() -> dict[str, Any]:
        """Liveness and the current job's status; always open (no token needed)."""
        return {
            "status": "ok",
            "version": __version__,
            "auth_required": auth.required,
            "uptime_s": time.time() - started,
            "job": manager.status(),
        }

    @router.get(
        "/metrics", response_model=MetricsOut, dependencies=guarded, responses=_UNAUTHORIZED, tags=["metrics"]
    )
    def metrics(
        limit: int = Query(100, ge=0, le=2000, description="how many recent metrics_update events"),
    ) -> dict:
        """The latest value of every metric and the most recent `metrics_update` events."""
        recent = manager.bus.history(METRICS_UPDATE, limit=limit) if limit else []
        return {"job": manager.status(), "latest": dict(manager.bus.latest), "recent": recent}

    @router.get(
        "/presets", response_model=PresetsOut, dependencies=guarded, responses=_UNAUTHORIZED, tags=["control"]
    )
    def presets() -> dict[str, Any]:
        """The preset names `POST /control/start` accepts."""
        return {"presets": preset_names(), "default": manager.default_preset}

    @router.post(
        "/control/start",
        response_model=StartOut,
        status_code=201,
        dependencies=guarded,
        responses={**_UNAUTHORIZED, **_BAD_INPUT, **_CONFLICT},
        tags=["control"],
    )
    def start(body: StartRequest | None = None) -> dict[str, Any]:
        """Start a job in the background from a preset (409 while another job runs)."""
        body = body or StartRequest.model_validate({})
        run_id = manager.start(body.preset, body.overrides, body.steps)
        return {"run_id": run_id, "job": manager.status()}

    @router.post(
        "/control/stop",
        response_model=StopOut,
        dependencies=guarded,
        responses={**_UNAUTHORIZED, **_CONFLICT},
        tags=["control"],
    )
    def stop() -> dict[str, Any]:
        """Ask the running job to stop at its next safe point (409 when none runs)."""
        run_id = manager.stop()
        return {"run_id": run_id, "job": manager.status()}

    @router.post(
        "/control/save",
        response_model=SaveOut,
        dependencies=guarded,
        responses={**_UNAUTHORIZED, **_CONFLICT, 503: {"model": ErrorOut, "description": "save timed out"}},
        tags=["control"],
    )
    def save() -> dict[str, Any]:
        """Write a checkpoint now and return its path (409 when no job runs)."""
        path = manager.save()
        return {"run_id": manager.run_id() or "", "path": str(path)}

    @router.get("/runs", response_model=RunsOut, dependencies=guarded, responses=_UNAUTHORIZED, tags=["runs"])
    def runs() -> dict[str, Any]:
        """Runs found in the runs directory, newest first."""
        return {"runs": manager.list_runs()}

    @router.get(
        "/runs/{run_id}",
        response_model=RunDetail,
        dependencies=guarded,
        responses={**_UNAUTHORIZED, 404: {"model": ErrorOut, "description": "unknown run id"}},
        tags=["runs"],
    )
    def run_detail(
        run_id: str = Path(..., max_length=200, description="a run id from GET /runs"),
        limit: int = Query(500, ge=0, le=5000, description="how many of the last metrics_update events"),
    ) -> dict[str, Any]:
        """One run: its config, checkpoints and its last metrics events."""
        return manager.get_run(run_id, limit=limit)

    @router.get(
        "/config", response_model=ConfigOut, dependencies=guarded, responses=_UNAUTHORIZED, tags=["config"]
    )
    def get_config() -> dict[str, Any]:
        """The current (or last) job's config and the keys `PATCH /config` may change."""
        return manager.config()

    @router.patch(
        "/config",
        response_model=ConfigPatchOut,
        dependencies=guarded,
        responses={**_UNAUTHORIZED, **_BAD_INPUT, **_CONFLICT},
        tags=["config"],
    )
    def patch_config(body: ConfigPatch) -> dict[str, Any]:
        """Change live-safe keys of the running job (e.g. `training.learning_rate`); the trainer
        applies them at its next update and announces a `config_updated` event."""
        applied = manager.update_config(dict(body.root))
        return {"run_id": manager.run_id(), "applied": applied}

    return router
