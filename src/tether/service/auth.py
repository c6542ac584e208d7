"""Bearer-token checks and browser-facing request guards for the service.

Token rule: when a token is configured, every endpoint except `/health`, the dashboard's static
files and the OpenAPI document needs `Authorization: Bearer <token>` (run configs can hold broker
credentials, so reads are guarded too). The WebSocket takes the token from the `Authorization`
header, a `bearer.<token>` entry in `Sec-WebSocket-Protocol` (what browsers can send), or a
`?token=` query parameter. Tokens are compared with `hmac.compare_digest`.

Without a token the service only binds to loopback (see `server.py`); there the request guard
also blocks the two ways a web page in the same browser could reach it: a foreign `Origin` on a
state-changing request or WebSocket (CSRF / cross-site WebSocket hijacking) and a non-loopback
`Host` header (DNS rebinding).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, WebSocket, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WS_BEARER_PREFIX = "bearer."
WS_SUBPROTOCOL = "tether"
MAX_BODY_BYTES = 64 * 1024

_UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def tokens_match(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def bearer_from_header(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def offered_subprotocols(websocket: WebSocket) -> list[str]:
    raw = websocket.headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def websocket_token(websocket: WebSocket) -> str | None:
    """The token a WebSocket client presented, by header, subprotocol or query (in that order)."""
    token = bearer_from_header(websocket.headers.get("authorization"))
    if token is not None:
        return token
    for proto in offered_subprotocols(websocket):
        if proto.startswith(WS_BEARER_PREFIX) and len(proto) > len(WS_BEARER_PREFIX):
            return proto[len(WS_BEARER_PREFIX) :]
    return websocket.query_params.get("token")


class TokenAuth:
    """Holds the configured token (or None) and checks requests against it."""

    def __init__(self, token: str | None) -> None:
        self.token = token or None

    @property
    def required(self) -> bool:
        return self.token is not None

    def check_request(self, request: Request) -> None:
        """FastAPI dependency body: 401 unless the request carries the token (when one is set)."""
        if self.token is None:
            return
        if not tokens_match(bearer_from_header(request.headers.get("authorization")), self.token):
            raise HTTPException(
                status_code=status.HTTP_401_UNAUTHORIZED,
                detail="a valid token is required: send the header 'Authorization: Bearer <token>'.",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check_websocket(self, websocket: WebSocket) -> bool:
        return self.token is None or tokens_match(websocket_token(websocket), self.token)


def is_loopback_host(host: str) -> bool:
    """True for a literal loopback address or `localhost` (no DNS: a name could be rebound)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(authority: str) -> str:
    """The host part of a `Host` header or an origin's netloc (drops the port, keeps IPv6)."""
    return urlsplit(f"//{authority}").hostname or ""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class RequestGuard:
    """ASGI middleware: same-origin and Host checks, and a cap on request body size."""

    def __init__(self, app: ASGIApp, loopback_only: bool, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.loopback_only = loopback_only
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host_header = _header(scope, b"host")
        if self.loopback_only and host_header is not None and not is_loopback_host(_host_of(host_header)):
            await _refuse(
                scope, send, 421, "this service only answers to a loopback Host (127.0.0.1 or localhost)."
            )
            return
        origin = _header(scope, b"origin")
        guarded = scope["type"] == "websocket" or scope.get("method", "GET") in _UNSAFE_METHODS
        if guarded and origin is not None and not _same_origin(origin, host_header):
            await _refuse(
                scope, send, 403, "cross-origin requests are refused; use the dashboard this service serves."
            )
            return
        if scope["type"] == "http" and scope.get("method", "GET") in _UNSAFE_METHODS:
            await self._with_bounded_body(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _with_bounded_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_body:
            await _refuse(scope, send, 413, f"the request body is larger than {self.max_body} bytes.")
            return
        # Read the whole (small) body first so an oversized chunked body is refused cleanly.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                await _refuse(scope, send, 413, f"the request body is larger than {self.max_body} bytes.")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _same_origin(origin: str, host_header: str | None) -> bool:
    if host_header is None:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return parts.netloc.lower() == host_header.strip().lower()


async def _refuse(scope: Scope, send: Send, code: int, detail: str) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting makes the server answer the handshake with HTTP 403.
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
        return
    body = json.dumps({"detail": detail}).encode()
    headers: Iterable[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": code, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})
