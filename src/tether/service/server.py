"""Run the service with uvicorn, in the foreground or in a daemon thread beside a trainer."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI

from tether.errors import TetherError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class ServiceError(TetherError):
    """The service cannot start as asked (bind refused, port taken)."""


def is_loopback_bind(host: str) -> bool:
    """True when `host` only listens on this machine: a loopback address or `localhost`."""
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other name may resolve to a reachable address


def check_bind(host: str, token: str | None) -> None:
    if not token and not is_loopback_bind(host):
        raise ServiceError(
            f"refusing to listen on {host} without a token; pass --token (or set TETHER_TOKEN), "
            "or bind to 127.0.0.1."
        )


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so a taken port is one clear error and port 0 works."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServiceError(
            f"cannot resolve host '{host}' ({exc.strerror}); pass an IP address such as 127.0.0.1."
        ) from None
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServiceError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port.") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


class RedactTokens(logging.Filter):
    """Masks `token=...` in uvicorn's log lines (it logs WebSocket paths with their query)."""

    _pattern = re.compile(r"(token=)[^&\s\"']*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._pattern.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str):
            record.msg = self._pattern.sub(r"\1***", record.msg)
        return True


def _redact_uvicorn_logs() -> None:
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


def _server(app: FastAPI, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,  # WebSocket URLs may carry ?token=; keep them out of logs
        lifespan="on",
        ws_max_size=64 * 1024,
        timeout_graceful_shutdown=5,
    )
    _redact_uvicorn_logs()  # after Config: it (re)configures uvicorn's loggers
    return uvicorn.Server(config)


@dataclass
class ServiceHandle:
    """A service running in a daemon thread. `url` is the dashboard's address."""

    url: str
    host: str
    port: int
    server: uvicorn.Server = field(repr=False)
    thread: threading.Thread = field(repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for its thread (the trainer is not touched)."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("the service thread did not stop within %.0f s", timeout)

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and self.server.started


def start_in_thread(
    app: FastAPI,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    log_level: str = "warning",
    startup_timeout: float = 30.0,
) -> ServiceHandle:
    """Serve `app` from a daemon thread; returns once it accepts connections."""
    check_bind(host, token)
    sock = bind_socket(host, port)
    actual_port = int(sock.getsockname()[1])
    server = _server(app, log_level)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="tether-service", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise ServiceError(f"the service on {host}:{actual_port} failed to start; see the log above.")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise ServiceError(
                f"the service on {host}:{actual_port} did not start within {startup_timeout:.0f} s."
            )
        time.sleep(0.02)
    url = _url(host, actual_port)
    log.info("service listening on %s", url)
    return ServiceHandle(url=url, host=host, port=actual_port, server=server, thread=thread)


def serve_foreground(
    app: FastAPI,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve until interrupted (Ctrl-C stops a job the service started, then exits)."""
    check_bind(host, token)
    sock = bind_socket(host, port)
    _server(app, log_level).run(sockets=[sock])
