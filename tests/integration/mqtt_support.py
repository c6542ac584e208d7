"""Helpers for the MQTT integration tests: a real Mosquitto on a free port, and an observer
client that records what the server publishes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tether.ingest.android_sim import connect, make_client
from tether.ingest.mqtt_protocol import Topics, dumps

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")

requires_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="the mosquitto binary is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A broker process with its own config file (and password file when `users` is given)."""

    def __init__(self, workdir: Path, users: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.users = users
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mosquitto.log"

    def start(self) -> Mosquitto:
        assert MOSQUITTO is not None
        lines = [
            f"listener {self.port} 127.0.0.1",
            # Queue everything for offline persistent sessions (the default 1000 drops QoS 1 logs).
            "max_queued_messages 0",
            "max_inflight_messages 100",
            "persistence false",
            "set_tcp_nodelay true",
            f"log_dest file {self.log}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto' and cannot read our files
        if self.users:
            assert MOSQUITTO_PASSWD is not None
            pwfile = self.workdir / "passwd"
            first = True
            for user, password in self.users.items():
                args = [MOSQUITTO_PASSWD, "-b"] + (["-c"] if first else []) + [str(pwfile), user, password]
                subprocess.run(args, check=True, capture_output=True)
                first = False
            pwfile.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {self.log.read_text() if self.log.exists() else ''}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


class Observer:
    """A client that subscribes to topic filters and keeps every message (retained included)."""

    def __init__(
        self, port: int, filters: list[str], username: str | None = None, password: str | None = None
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.retained: dict[str, bytes] = {}
        self._cond = threading.Condition()
        self.client = make_client(f"observer-{uuid.uuid4().hex[:8]}", username=username, password=password)
        self.client.on_message = self._on_message
        connect(self.client, "127.0.0.1", port)
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe([(f, 1) for f in filters])
        assert done.wait(10), "subscription not acknowledged"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.retained[msg.topic] = bytes(msg.payload)  # latest per topic
            self._cond.notify_all()

    def json_on(self, topic: str) -> list[dict[str, Any]]:
        with self._cond:
            out = []
            for t, payload, _ in self.messages:
                if t == topic and payload:
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(payload))
            return out

    def latest_json(self, topic: str) -> dict[str, Any] | None:
        with self._cond:
            payload = self.retained.get(topic)
        return json.loads(payload) if payload else None

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting for an MQTT message")
                self._cond.wait(min(left, 0.2))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def send_command(
    observer: Observer, topics: Topics, command: str, timeout: float = 30.0, **fields: Any
) -> dict[str, Any]:
    """Publish a command and return the server's reply (matched by id) from the status topic."""
    cid = uuid.uuid4().hex[:12]
    observer.client.publish(topics.command, dumps({"v": 1, "command": command, "id": cid, **fields}), qos=1)

    def reply() -> dict | None:
        for msg in observer.json_on(topics.status):
            if msg.get("type") == "reply" and msg.get("id") == cid:
                return msg
        return None

    return observer.wait_for(reply, timeout)


def transition(device: str, seq: int, app: str = "com.example.test", **over: Any) -> dict[str, Any]:
    t = {
        "v": 1,
        "device_id": device,
        "app": app,
        "episode": 0,
        "step": seq,
        "seq": seq,
        "state": f"screen{seq % 5}",
        "action": "tap:Next",
        "reward": 0.5,
        "next_state": f"screen{(seq + 1) % 5}",
        "done": False,
        "available_actions": ["tap:Next", "tap:Back"],
    }
    t.update(over)
    return t


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.02,
    describe: Callable[[], str] | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time" + (f": {describe()}" if describe else ""))
        time.sleep(interval)
