"""WebSocket `/ws`: the metrics bus's events, one JSON text message per event.

Each connection gets its own bounded, drop-oldest `Subscription` on the bus. The trainer thread only
appends to that queue and schedules a wake-up on the event loop (`call_soon_threadsafe`), so a slow
or dead browser can never block it; the connection's sender task drains the queue at its own pace.
A new connection first receives the recent history (the bus's replay) so its charts start full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from tether.metrics import Event
from tether.service.auth import WS_SUBPROTOCOL, TokenAuth, offered_subprotocols
from tether.service.jobs import JobManager

log = logging.getLogger(__name__)

DEFAULT_QUEUE = 1000
# Client messages are ignored (the socket is server → client); a client that floods is cut off.
MAX_CLIENT_MESSAGE = 4096


def sanitize(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (browsers' JSON.parse rejects NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:  # numpy scalars and the like
        return sanitize(float(value))
    except (TypeError, ValueError):
        return str(value)


def encode_event(event: Event) -> str:
    try:
        return json.dumps(event, allow_nan=False, separators=(",", ":"))
    except (ValueError, TypeError):
        return json.dumps(sanitize(event), allow_nan=False, separators=(",", ":"))


def build_ws_router(manager: JobManager, auth: TokenAuth, queue_size: int = DEFAULT_QUEUE) -> APIRouter:
    router = APIRouter()

    @router.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        if not auth.check_websocket(websocket):
            # Before accept: the handshake is answered with HTTP 403.
            await websocket.close(code=1008, reason="a valid token is required")
            return
        offered = offered_subprotocols(websocket)
        await websocket.accept(subprotocol=WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None)

        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def notify() -> None:  # called on the emitting (trainer) thread: just schedule a wake-up
            loop.call_soon_threadsafe(wake.set)

        sub = manager.bus.subscribe(maxsize=queue_size, replay=True, notify=notify)
        sender = asyncio.create_task(_send_events(websocket, sub, wake))
        receiver = asyncio.create_task(_receive_until_closed(websocket))
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, (WebSocketDisconnect, OSError, RuntimeError)):
                    log.warning("websocket ended with %r", exc)
        finally:
            sub.close()
            for task in (sender, receiver):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            if sub.dropped:
                log.info("a websocket viewer lagged; %d events were dropped for it", sub.dropped)
            with contextlib.suppress(Exception):
                await websocket.close()

    return router


async def _send_events(websocket: WebSocket, sub: Any, wake: asyncio.Event) -> None:
    while True:
        # Clear before draining: an event put after the drain sets the flag again, so none is missed.
        wake.clear()
        events = sub.drain()
        if not events:
            await wake.wait()
            continue
        for event in events:
            await websocket.send_text(encode_event(event))


async def _receive_until_closed(websocket: WebSocket) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        size = len(message.get("text") or "") + len(message.get("bytes") or b"")
        if size > MAX_CLIENT_MESSAGE:
            await websocket.close(code=1009, reason="message too big")
            return
