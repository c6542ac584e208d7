"""The FastAPI app factory: REST routes, the `/ws` WebSocket and the dashboard at `/`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from tether.errors import TetherError
from tether.service.auth import RequestGuard, TokenAuth
from tether.service.jobs import JobConflict, JobManager, RunNotFound, SaveTimeout
from tether.service.routes import build_router
from tether.service.websocket import DEFAULT_QUEUE, build_ws_router, sanitize

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

# The dashboard loads nothing from elsewhere; say so to the browser.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class SafeJSONResponse(JSONResponse):
    """JSON with non-finite floats as null: a NaN loss must not turn a GET into a 500."""

    def render(self, content: Any) -> bytes:
        try:
            text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (ValueError, TypeError):
            text = json.dumps(sanitize(content), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")


def _validation_message(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    if not errors:
        return "the request is malformed.", errors
    first = errors[0]
    if first["type"] == "json_invalid":
        return (
            "the request body is not valid JSON; send a JSON object with Content-Type: application/json.",
            errors,
        )
    if first["loc"] == ["body"] and first["type"] in ("dict_type", "model_attributes_type", "missing"):
        return "the request body must be a JSON object; send it with Content-Type: application/json.", errors
    where = ".".join(p for p in first["loc"] if p != "body") or "body"
    if first["loc"][:1] == ["body"] and where == "body":
        where = "request body"
    return f"{where}: {first['msg']}.", errors


def create_app(
    manager: JobManager,
    token: str | None = None,
    *,
    loopback_host_check: bool | None = None,
    ws_queue_size: int = DEFAULT_QUEUE,
    stop_jobs_on_shutdown: bool = True,
) -> FastAPI:
    """Build the service around `manager`. With `token`, everything but `/health`, the dashboard's
    files and `/openapi.json` needs `Authorization: Bearer <token>`. Without a token the service
    must be bound to loopback, and by default it refuses requests whose Host is not loopback."""
    auth = TokenAuth(token)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if stop_jobs_on_shutdown:
            manager.shutdown()

    app = FastAPI(
        title="Tether service",
        version=_version(),
        description="Watch and steer Tether training jobs: REST control, a WebSocket stream, a dashboard.",
        docs_url=None,  # the Swagger page would load assets from a CDN; the dashboard works offline
        redoc_url=None,
        default_response_class=SafeJSONResponse,
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.auth = auth

    _add_error_handlers(app)
    app.include_router(build_router(manager, auth))
    app.include_router(build_ws_router(manager, auth, queue_size=ws_queue_size))

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=DASHBOARD_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    check_hosts = token is None if loopback_host_check is None else loopback_host_check
    app.add_middleware(RequestGuard, loopback_only=check_hosts)
    return app


def _version() -> str:
    from tether import __version__

    return __version__


def _add_error_handlers(app: FastAPI) -> None:
    def error(status: int, detail: str, headers: dict[str, str] | None = None) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        detail, errors = _validation_message(exc)
        return SafeJSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(JobConflict)
    async def on_conflict(_request: Request, exc: JobConflict) -> SafeJSONResponse:
        return error(409, str(exc))

    @app.exception_handler(RunNotFound)
    async def on_not_found(_request: Request, exc: RunNotFound) -> SafeJSONResponse:
        return error(404, str(exc))

    @app.exception_handler(SaveTimeout)
    async def on_save_timeout(_request: Request, exc: SaveTimeout) -> SafeJSONResponse:
        return error(503, str(exc), {"Retry-After": "5"})

    @app.exception_handler(TetherError)
    async def on_user_error(_request: Request, exc: TetherError) -> SafeJSONResponse:
        return error(400, str(exc))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> SafeJSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, f"internal error ({type(exc).__name__}); see the server log.")
