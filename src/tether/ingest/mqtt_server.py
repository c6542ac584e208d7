"""`MLTrainingServer`: learns from Visual Mapper devices over MQTT and publishes what it learned.

Threads and ownership:

* the paho network thread receives messages, validates them (`mqtt_protocol`), appends accepted
  log payloads to an on-disk journal and puts them on a bounded queue; it then returns, and only
  then does paho send the PUBACK. So a message the broker considers delivered is on disk (the
  OS page cache survives a SIGKILL of this process), and one that is not yet on disk is not
  acknowledged and will be redelivered through the persistent session;
* the learner thread is the only owner of the model: it drops repeats by (device_id, seq),
  learns, publishes Q-tables / the model / status, runs commands and writes checkpoints.

A checkpoint holds the model, the de-duplication windows and the journal position it covers;
at start the server loads it and replays the journal from that position, so a crash at any
moment loses nothing acknowledged and learns nothing twice.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import math
import os
import secrets
import shutil
import socket
import ssl
import struct
import sys
import threading
import time
import warnings
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import paho.mqtt.client as mqtt
import torch
from paho.mqtt.enums import CallbackAPIVersion

from tether.algos.qtable import Config as QTableConfig
from tether.algos.qtable import QTableLearner
from tether.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from tether.errors import TetherError
from tether.ingest.mqtt_protocol import (
    DEFAULT_PREFIX,
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    Command,
    ProtocolError,
    Reason,
    Topics,
    Transition,
    dumps,
    offline_status,
    parse_command,
    parse_device_status,
    parse_log_message,
    qtable_message,
    validate_prefix,
)

log = logging.getLogger(__name__)

TAG = "[MLTrainingServer]"
CHECKPOINT_NAME = "mqtt_server.pt"
CHECKPOINT_FORMAT = "tether-mqtt-server"


class MQTTServerError(TetherError):
    """The training server cannot start or run; the message names the likely cause."""


class MQTTConnectionError(MQTTServerError):
    """The broker could not be reached or refused us."""


@dataclass
class ServerConfig:
    """Everything `tether mqtt` can set. Defaults suit a Home Assistant add-on on a small host."""

    broker: str = "localhost"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_insecure: bool = False
    topic_prefix: str = DEFAULT_PREFIX
    client_id: str = "tether-ml-training"  # stable, so the broker keeps our session across restarts
    data_dir: Path = field(default_factory=lambda: Path("data"))
    use_dqn: bool = False
    provider: Literal["cpu", "npu", "coral"] = "cpu"
    batch_size: int = 64
    save_interval: float = 60.0
    status_interval: float = 10.0
    qtable_interval: float = 0.05  # minimum seconds between two publishes of one app's Q-table
    model_interval: float = 30.0  # minimum seconds between two DQN model publishes
    learning_rate: float = 0.5  # app navigation is close to deterministic: large steps converge fast
    discount: float = 0.9
    keepalive: int = 30
    connect_timeout: float = 10.0
    reconnect_min_delay: int = 1
    reconnect_max_delay: int = 60
    queue_transitions: int = 32_768  # bound on validated transitions waiting for the learner
    dedup_window: int = 4_096
    max_devices: int = 10_000
    max_apps: int = 200
    max_entries: int = 1_000_000  # (state, action) pairs over all apps: bounds memory
    max_actions_per_state: int = 512
    replay_capacity: int = 100_000
    journal: bool = True
    journal_checkpoint_bytes: int = 64 * 1024 * 1024
    journal_segment_bytes: int = 16 * 1024 * 1024
    error_notices_per_s: float = 10.0
    ha_discovery: bool = False
    ha_prefix: str = "homeassistant"
    seed: int = 0
    # While the learner computes, paho's thread needs the GIL after every socket call; CPython's
    # default 5 ms switch interval would then cap ingest at a few hundred packets per second.
    gil_switch_interval: float | None = 0.0005

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        try:
            validate_prefix(self.topic_prefix)
        except ValueError as exc:
            raise MQTTServerError(str(exc)) from None
        if not 0 < self.port < 65536:
            raise MQTTServerError(f"MQTT port {self.port} is out of range; pass --port between 1 and 65535.")
        if self.batch_size < 1:
            raise MQTTServerError("--batch-size must be at least 1.")
        if self.save_interval <= 0:
            raise MQTTServerError("--save-interval must be a positive number of seconds.")
        if not self.client_id or len(self.client_id) > 128:
            raise MQTTServerError("the MQTT client id must be 1 to 128 characters.")
        if self.password and not self.username:
            raise MQTTServerError("a password was given without a username; pass --username too.")


# ------------------------------------------------------------------------------ de-duplication
class DedupWindow:
    """Which (device_id, seq) pairs were already learned, in bounded memory.

    Per device: the highest seq seen and the set of lower seqs within `window` that are still
    missing (arrived out of order or not yet). A seq below `high - window` is treated as seen, so
    memory per device is at most `window` ints; devices beyond `max_devices` are forgotten least
    recently used first."""

    def __init__(self, window: int = 4096, max_devices: int = 10_000) -> None:
        self.window = window
        self.max_devices = max_devices
        self._devices: OrderedDict[str, tuple[int, set[int]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._devices)

    def seen(self, device: str, seq: int) -> bool:
        """True if (device, seq) was seen before; otherwise records it and returns False."""
        entry = self._devices.get(device)
        if entry is None:
            if len(self._devices) >= self.max_devices:
                self._devices.popitem(last=False)
            # The first seq from a device opens its window; lower ones may still arrive late.
            low = max(0, seq - self.window)
            self._devices[device] = (seq, set(range(low, seq)) if seq - low <= self.window else set())
            return False
        self._devices.move_to_end(device)
        high, missing = entry
        if seq > high:
            if seq - high > 1:
                missing.update(range(max(high + 1, seq - self.window), seq))
            floor = seq - self.window
            if missing and min(missing) < floor:
                missing.difference_update([s for s in missing if s < floor])
            self._devices[device] = (seq, missing)
            return False
        if seq in missing:
            missing.discard(seq)
            return False
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "devices": {d: [h, sorted(m)] for d, (h, m) in self._devices.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._devices.clear()
        for device, (high, missing) in state.get("devices", {}).items():
            self._devices[str(device)] = (int(high), {int(s) for s in missing})


# ------------------------------------------------------------------------------------- journal
_RECORD = struct.Struct("<II")  # payload length, crc32


class Journal:
    """Append-only segments of accepted log payloads (`[len][crc32][payload]` records).

    Only the network thread appends; the learner deletes segments a checkpoint covers. A record
    cut short by a crash fails its length or CRC check and ends the replay of that segment (its
    message was never acknowledged, so the broker sends it again)."""

    def __init__(self, directory: Path, segment_bytes: int = 16 * 1024 * 1024) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        directory.mkdir(parents=True, exist_ok=True)
        existing = self.segments()
        # Never append after a possibly torn tail: each start opens a fresh segment.
        self._seg = (existing[-1] + 1) if existing else 1
        self._fd = self._open(self._seg)
        self._offset = 0
        self.appended_bytes = 0

    def _path(self, seg: int) -> Path:
        return self.directory / f"seg-{seg:08d}.log"

    def _open(self, seg: int) -> int:
        return os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def segments(self) -> list[int]:
        out = []
        for p in self.directory.glob("seg-*.log"):
            with contextlib.suppress(ValueError):
                out.append(int(p.stem[4:]))
        return sorted(out)

    def append(self, payload: bytes) -> tuple[int, int]:
        """Write one record with a single write() call; returns the position after it."""
        if self._offset >= self.segment_bytes:
            os.close(self._fd)
            self._seg += 1
            self._fd = self._open(self._seg)
            self._offset = 0
        record = _RECORD.pack(len(payload), zlib.crc32(payload)) + payload
        written = os.write(self._fd, record)
        if written != len(record):  # a full disk: say so rather than acknowledge a torn record
            raise OSError(f"short write to the journal ({written} of {len(record)} bytes)")
        self._offset += written
        self.appended_bytes += written
        return self._seg, self._offset

    def replay(self, start: tuple[int, int]) -> Iterator[tuple[bytes, tuple[int, int]]]:
        """Payloads after position `start` = (segment, offset), with the position after each."""
        for seg in self.segments():
            if seg < start[0] or seg >= self._seg:
                continue
            data = self._path(seg).read_bytes()
            pos = start[1] if seg == start[0] else 0
            while pos + _RECORD.size <= len(data):
                length, crc = _RECORD.unpack_from(data, pos)
                end = pos + _RECORD.size + length
                if length > MAX_PAYLOAD_BYTES or end > len(data):
                    log.warning("%s journal segment %d ends in a torn record; skipping its tail", TAG, seg)
                    break
                payload = data[pos + _RECORD.size : end]
                if zlib.crc32(payload) != crc:
                    log.warning("%s journal segment %d has a corrupt record; skipping its tail", TAG, seg)
                    break
                pos = end
                yield payload, (seg, pos)

    def drop_before(self, seg: int) -> None:
        """Delete segments older than `seg` (a checkpoint covers them)."""
        for s in self.segments():
            if s < seg and s != self._seg:
                self._path(s).unlink(missing_ok=True)

    @property
    def position(self) -> tuple[int, int]:
        return self._seg, self._offset

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


# ----------------------------------------------------------------------------------- work queue
@dataclass
class _LogItem:
    transitions: list[Transition]
    position: tuple[int, int] | None  # journal position after this message
    received: float  # monotonic time the message arrived


@dataclass
class _CommandItem:
    command: Command


class _WorkQueue:
    """FIFO bounded by the number of transitions it holds (a batch weighs its length)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[tuple[Any, int]] = deque()
        self._weight = 0
        self._cond = threading.Condition()

    def put(self, item: Any, weight: int, stop: threading.Event) -> bool:
        with self._cond:
            while self._weight and self._weight + weight > self.capacity:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            self._items.append((item, weight))
            self._weight += weight
            self._cond.notify_all()
            return True

    def get_many(self, timeout: float, max_weight: int) -> list[Any]:
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait(timeout)
            out: list[Any] = []
            taken = 0
            while self._items and taken < max_weight:
                item, weight = self._items.popleft()
                out.append(item)
                taken += weight
            if out:
                self._weight -= taken
                self._cond.notify_all()
            return out

    def __len__(self) -> int:
        return self._weight


# --------------------------------------------------------------------------------------- models
class QTableModel:
    """One sparse Q-table per app (tables stay small to publish), with global size limits."""

    kind = "qtable"

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._qcfg = QTableConfig.model_validate(
            {"learning_rate": config.learning_rate, "discount_factor": config.discount}
        )
        self.learners: dict[str, QTableLearner] = {}
        self.entries = 0

    def _learner(self, app: str) -> QTableLearner:
        learner = self.learners.get(app)
        if learner is None:
            if len(self.learners) >= self.config.max_apps:
                raise ProtocolError(
                    Reason.TABLE_FULL, f"the server already tracks {self.config.max_apps} apps"
                )
            learner = self.learners[app] = QTableLearner(self._qcfg, seed=self.config.seed)
        return learner

    def learn(self, t: Transition) -> None:
        """One Q-learning update — the same as `QTableLearner.learn`, inlined for string keys
        because this runs up to ~10^5 times a second — after checking the memory limits."""
        learner = self._learner(t.app)
        table, cfg = learner.table, self.config
        s, a, s2, avail = t.state, t.action, t.next_state, t.available_actions
        row, nrow = table.get(s), table.get(s2)
        new_a = row is None or a not in row
        if new_a and row is not None and len(row) >= cfg.max_actions_per_state:
            raise ProtocolError(Reason.TABLE_FULL, "state has too many actions")
        new_next = [x for x in avail if nrow is None or x not in nrow]
        if s2 == s and new_a and a not in new_next:
            new_next.append(a)  # a self-loop: the state's row also gets the action
        if nrow is not None and len(nrow) + len(new_next) > cfg.max_actions_per_state:
            raise ProtocolError(Reason.TABLE_FULL, "next_state has too many actions")
        if self.entries + new_a + len(new_next) > cfg.max_entries:
            raise ProtocolError(Reason.TABLE_FULL, f"the Q-tables hold {self.entries} entries, the limit")
        init = self._qcfg.initial_q
        before = (len(row) if row else 0) + (len(nrow) if nrow is not None and s2 != s else 0)
        if row is None:
            row = table[s] = {}
        if new_a:
            row[a] = init
        if t.done:
            target = t.reward  # terminal: no bootstrap
            if avail:
                nrow = table.get(s2)
                if nrow is None:
                    nrow = table[s2] = {}
                for x in avail:
                    if x not in nrow:
                        nrow[x] = init
        else:
            nrow = table.get(s2)
            if nrow is None:
                nrow = table[s2] = {}
            for x in avail:
                if x not in nrow:
                    nrow[x] = init
            target = t.reward + self._qcfg.discount_factor * (max(nrow.values()) if nrow else 0.0)
        row[a] += self._qcfg.learning_rate * (target - row[a])
        learner.steps += 1
        nrow = table.get(s2)
        self.entries += len(row) + (len(nrow) if nrow is not None and s2 != s else 0) - before

    def replay(self, transitions: list[Transition], epochs: int) -> int:
        """Extra passes over recent experience, newest first (values flow back along paths faster)."""
        n = 0
        for _ in range(epochs):
            for t in reversed(transitions):
                learner = self.learners.get(t.app)
                if learner is not None:
                    learner.learn(
                        t.state, t.action, t.reward, t.next_state, t.done, t.available_actions or None
                    )
                    n += 1
        return n

    def apps(self) -> list[str]:
        return list(self.learners)

    def table(self, app: str) -> dict[str, dict[str, float]]:
        learner = self.learners.get(app)
        if learner is None:
            return {}
        return {str(s): {str(a): q for a, q in row.items()} for s, row in learner.table.items()}

    def reset(self, app: str | None = None) -> list[str]:
        cleared = [app] if app is not None else list(self.learners)
        for name in cleared:
            self.learners.pop(name, None)
        self.entries = sum(lr.num_entries for lr in self.learners.values())
        return cleared

    def stats(self) -> dict[str, int]:
        return {
            "apps": len(self.learners),
            "states": sum(lr.num_states for lr in self.learners.values()),
            "entries": self.entries,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"apps": {app: lr.state_dict() for app, lr in self.learners.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learners = {}
        for app, sd in state.get("apps", {}).items():
            learner = QTableLearner(self._qcfg, seed=self.config.seed)
            learner.load_state_dict(sd)
            self.learners[str(app)] = learner
        self.entries = sum(lr.num_entries for lr in self.learners.values())


# ------------------------------------------------------------------------------------- counters
@dataclass
class Counters:
    """What the server has seen. Each field has one writing thread (noted)."""

    received: int = 0  # log messages (network thread)
    transitions_received: int = 0  # transitions in valid log messages (network thread)
    accepted: int = 0  # transitions learned (learner)
    duplicates: int = 0  # transitions dropped as repeats of a (device_id, seq) (learner)
    published: int = 0  # messages published (learner; replies from the network thread too)
    commands: int = 0  # commands run (learner)
    rejected: dict[str, int] = field(default_factory=dict)  # by reason (both threads, under a lock)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "transitions_received": self.transitions_received,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "published": self.published,
            "commands": self.commands,
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
        }


class _TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            return False


# --------------------------------------------------------------------------------------- server
def describe_connect_error(exc: BaseException, config: ServerConfig) -> str:
    """One sentence naming the likely cause of a failed TCP/TLS connection."""
    where = f"{config.broker}:{config.port}"
    if isinstance(exc, socket.gaierror):
        return (
            f"cannot resolve the MQTT broker address '{config.broker}': check --broker "
            "(try the IP address of the machine running Mosquitto)."
        )
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"connection refused by {where}: no MQTT broker is listening there; check the broker address and "
            f"port, that the broker (e.g. the Mosquitto add-on) is running, and that a firewall allows "
            f"TCP port "
            f"{config.port}."
        )
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return (
            f"TLS handshake with {where} failed ({exc.__class__.__name__}: {exc}); check --tls-ca, "
            "that the port "
            "is a TLS listener (usually 8883), or use --tls-insecure only for testing."
        )
    if isinstance(exc, TimeoutError | socket.timeout):
        return (
            f"no answer from {where} within {config.connect_timeout:.0f} s: the address is wrong or a "
            "firewall "
            f"drops TCP port {config.port}."
        )
    return (
        f"cannot connect to the MQTT broker at {where} ({exc.__class__.__name__}: {exc}); check the broker "
        f"address, that the broker is running, and that a firewall allows TCP port {config.port}."
    )


def describe_connack(reason: Any, config: ServerConfig) -> str:
    """One sentence for a CONNACK refusal (wrong credentials, missing permission, other)."""
    value = getattr(reason, "value", reason)
    where = f"{config.broker}:{config.port}"
    user = f"user '{config.username}'" if config.username else "anonymous access (no --username)"
    if value in (4, 134):
        return (
            f"authentication failed at {where} for {user}: wrong username or password; check --username and "
            "--password (in Home Assistant: the Mosquitto add-on's logins or a Home Assistant user)."
        )
    if value in (5, 135):
        return (
            f"authentication failed at {where}: the broker refused {user} as not authorized; the username or "
            "password is wrong, anonymous access is disabled, or the user may not connect; pass "
            "--username/--password of a user allowed to publish and subscribe to "
            f"{config.topic_prefix}/exploration/#."
        )
    if value in (2, 133):
        return f"the broker at {where} rejected the client id '{config.client_id}'; pick another --client-id."
    return f"the broker at {where} refused the connection ({reason}); check the broker's log."


def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # Q-table updates are small and latency matters: do not let Nagle hold them back.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MLTrainingServer:
    """The Visual Mapper training server (see the module docstring).

    `start()`, `stop()`, `wait()`, `status()` and `connected` may be used from any thread.
    `reset()`, `export()` and `train()` run on the learner thread when they arrive as commands;
    call them directly only on a server that is not running."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.topics = Topics(config.topic_prefix)
        self.counters = Counters()
        self.dedup = DedupWindow(config.dedup_window, config.max_devices)
        self.model: Any = self._make_model()
        self._other_models: dict[str, Any] = {}  # the inactive mode's saved state, carried along
        self._queue = _WorkQueue(config.queue_transitions)
        self._replay: deque[Transition] = deque(maxlen=config.replay_capacity)
        self._rejected_lock = threading.Lock()
        self._notices = _TokenBucket(config.error_notices_per_s, burst=max(1.0, config.error_notices_per_s))
        self._errors: deque[dict[str, Any]] = deque(maxlen=10)
        self._devices: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._ever_connected = False
        self._connack = threading.Event()
        self._connack_reason: Any = None
        self._subscribed = threading.Event()
        self._learner_done = threading.Event()
        self._client: mqtt.Client | None = None
        self._learner: threading.Thread | None = None
        self._journal: Journal | None = None
        self._position: tuple[int, int] = (0, 0)
        self._saved_position: tuple[int, int] = (0, 0)
        self._journal_bytes_at_save = 0
        self._dirty_apps: set[str] = set()
        self._next_publish: dict[str, float] = {}
        self._qtable_versions: dict[str, int] = {}
        self._changed_since_save = False
        self._last_update: float | None = None
        self._last_save: float | None = None
        self._started = time.time()
        self._boot = secrets.token_hex(6)
        self._echo_seen = threading.Event()
        self._status_now = threading.Event()
        self._log_rejections = 0
        self._journal_errors = 0
        self.checkpoint_path = config.data_dir / CHECKPOINT_NAME

    # ------------------------------------------------------------------------------ lifecycle
    def _make_model(self) -> Any:
        if self.config.use_dqn:
            return DQNModel(self.config)
        return QTableModel(self.config)

    def start(self) -> None:
        """Load state, replay the journal, connect and subscribe (returns once the broker has
        acknowledged the subscriptions); raises MQTTConnectionError with a clear cause when the
        broker cannot be reached or refuses us."""
        cfg = self.config
        log.info(
            "%s Starting ML Training Server (mode %s, data in %s)...", TAG, self.model.kind, cfg.data_dir
        )
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if cfg.gil_switch_interval and sys.getswitchinterval() > cfg.gil_switch_interval:
            sys.setswitchinterval(cfg.gil_switch_interval)
        self._load()
        if cfg.journal:
            self._journal = Journal(cfg.data_dir / "journal", cfg.journal_segment_bytes)
            self._replay_journal()
        self._client = self._make_client()
        try:
            self._connect()
        except BaseException:
            self._close_journal()
            raise
        self._learner = threading.Thread(target=self._learner_loop, name="tether-mqtt-learner", daemon=True)
        self._learner.start()

    def _make_client(self) -> mqtt.Client:
        cfg = self.config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=False,  # persistent session: the broker queues QoS 1 logs while we are away
            protocol=mqtt.MQTTv311,
        )
        client.connect_timeout = cfg.connect_timeout
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(10_000)  # our own outgoing backlog while disconnected
        client.reconnect_delay_set(cfg.reconnect_min_delay, cfg.reconnect_max_delay)
        client.will_set(self.topics.status, offline_status(cfg.client_id), qos=1, retain=True)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            client.tls_set(
                ca_certs=cfg.tls_ca or None,
                cert_reqs=ssl.CERT_NONE if cfg.tls_insecure else ssl.CERT_REQUIRED,
            )
            if cfg.tls_insecure:
                client.tls_insecure_set(True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        client.on_socket_open = _set_nodelay
        return client

    def _connect(self) -> None:
        cfg, client = self.config, self._client
        assert client is not None
        if cfg.tls and cfg.tls_ca and not Path(cfg.tls_ca).is_file():
            raise MQTTConnectionError(
                f"TLS CA file {cfg.tls_ca} does not exist; pass the broker's CA with --tls-ca."
            )
        try:
            client.connect(cfg.broker, cfg.port, keepalive=cfg.keepalive)
        except (OSError, ssl.SSLError) as exc:
            raise MQTTConnectionError(describe_connect_error(exc, cfg)) from None
        client.loop_start()
        failure = self._handshake_failure()
        if failure is not None:
            client.loop_stop()
            with contextlib.suppress(Exception):
                client.disconnect()
            raise MQTTConnectionError(failure)

    def _handshake_failure(self) -> str | None:
        """Why the broker did not take us to a subscribed session within `connect_timeout`, or
        None. Subscribed, not just connected: on a new session, logs published before the SUBACK
        would not be queued for us and would be lost."""
        cfg = self.config
        if not self._connack.wait(cfg.connect_timeout):
            return (
                f"connected to {cfg.broker}:{cfg.port} but got no MQTT answer within "
                f"{cfg.connect_timeout:.0f} s; "
                "check that the port is an MQTT listener (a TLS listener needs --tls)."
            )
        reason = self._connack_reason
        if reason is not None and getattr(reason, "is_failure", False):
            return describe_connack(reason, cfg)
        if not self._subscribed.wait(cfg.connect_timeout):
            return (
                f"connected to {cfg.broker}:{cfg.port} but the broker did not acknowledge the "
                f"subscriptions within {cfg.connect_timeout:.0f} s."
            )
        return None

    def stop(self, timeout: float = 30.0) -> None:
        """Go offline (retained status), stop taking messages, and checkpoint what was learned; with
        the journal on, messages still queued are learned at the next start instead of now."""
        if self._stop.is_set():
            return
        client = self._client
        # Stop the network first so nothing new is acknowledged after the final checkpoint.
        if client is not None and self._connected.is_set():
            self._connected.clear()
            with contextlib.suppress(Exception):
                info = client.publish(
                    self.topics.status, offline_status(self.config.client_id), qos=1, retain=True
                )
                info.wait_for_publish(timeout=2.0)
        self._stop.set()
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
            client.loop_stop()
        if self._learner is not None:  # it writes the final checkpoint
            self._learner.join(timeout)
        # else start() failed: keep whatever checkpoint is on disk untouched.
        self._close_journal()
        log.info("%s Stopped (%d transitions learned).", TAG, self.counters.accepted)

    def _close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()

    def wait(self) -> None:
        """Block until `stop()` (from a signal handler or another thread)."""
        while not self._stop.wait(0.5):
            pass

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --------------------------------------------------------------------- network callbacks
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._connack_reason = reason
        self._connack.set()
        if reason.is_failure:
            if self._ever_connected:  # at start, start() raises this as the error instead
                log.error("%s %s", TAG, describe_connack(reason, self.config))
            return
        self._connected.set()
        self._ever_connected = True
        resumed = "resumed the persistent session" if flags.session_present else "new session"
        log.info(
            "%s Connected to MQTT broker at %s:%d (%s)", TAG, self.config.broker, self.config.port, resumed
        )
        try:
            self._subs = {
                self.topics.logs: 1,
                self.topics.command: 1,
                self.topics.device_status_filter: 0,
                self.topics.status: 0,  # our own status echoes back: proves we may publish
            }
            client.subscribe(list(self._subs.items()))
            self._echo_seen.clear()
            self._status_now.set()  # published by the learner thread, the model's only reader
            if self.config.ha_discovery:
                self._publish_discovery(client)
        except Exception:  # an exception here would end paho's network loop
            log.exception("%s error after connecting", TAG)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        for topic, rc in zip(self._subs, reasons, strict=False):
            if getattr(rc, "is_failure", False) or getattr(rc, "value", 0) >= 0x80:
                msg = (
                    f"the broker refused the subscription to {topic}: the MQTT user lacks subscribe "
                    "permission "
                    "there; allow it in the broker's ACL."
                )
                log.error("%s %s", TAG, msg)
                self._record_error("subscribe_denied", msg)
            else:
                log.info("%s Subscribed to %s", TAG, topic)
        self._subscribed.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if not self._stop.is_set() and was:
            log.warning("%s Disconnected from MQTT broker (%s); reconnecting with backoff", TAG, reason)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if not self._stop.is_set():
            log.warning(
                "%s Reconnect to %s:%d failed; retrying (is the broker running?)",
                TAG,
                self.config.broker,
                self.config.port,
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Never raise here: an exception would end paho's network loop.
        try:
            topic = msg.topic
            payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
            if topic == self.topics.logs:
                self._on_log(payload)
            elif topic == self.topics.command:
                self._on_command(payload)
            elif topic == self.topics.status:
                if self._boot.encode() in payload[:4096]:
                    self._echo_seen.set()
            elif topic.startswith(self.topics.status + "/"):
                self._on_device_status(topic, payload)
        except Exception:  # a bug, not bad input: keep serving
            log.exception("%s error while handling a message on %r", TAG, getattr(msg, "_topic", b"")[:200])

    def _on_log(self, payload: bytes) -> None:
        self.counters.received += 1
        try:
            transitions = parse_log_message(payload)
        except ProtocolError as exc:
            self._reject(exc, "logs")
            return
        self.counters.transitions_received += len(transitions)
        position = None
        if self._journal is not None:
            try:
                # On disk before paho acknowledges (when this callback returns).
                position = self._journal.append(payload)
            except OSError as exc:
                # Still learn it (dropping it would lose it for sure); only a crash can lose it now.
                self._journal_errors += 1
                if self._journal_errors <= 3 or self._journal_errors % 1000 == 0:
                    log.error("%s cannot write the journal (%s); is the disk full?", TAG, exc)
                self._record_error("journal_write_failed", str(exc))
        self._queue.put(_LogItem(transitions, position, time.monotonic()), len(transitions), self._stop)

    def _on_command(self, payload: bytes) -> None:
        try:
            command = parse_command(payload)
        except ProtocolError as exc:
            self._reject(exc, "command")
            return
        self._queue.put(_CommandItem(command), 1, self._stop)

    def _on_device_status(self, topic: str, payload: bytes) -> None:
        device = topic.rsplit("/", 1)[-1]
        if not payload:  # a device clearing its retained status
            self._devices.pop(device, None)
            return
        try:
            status = parse_device_status(payload)
        except ProtocolError as exc:
            self._reject(exc, "device_status", notify=False)
            return
        if device not in self._devices and len(self._devices) >= self.config.max_devices:
            self._devices.popitem(last=False)
        self._devices[device] = {"state": status.state, "seen": time.time()}
        self._devices.move_to_end(device)

    # ----------------------------------------------------------------------------- rejection
    def _count_rejection(self, reason: str) -> None:
        with self._rejected_lock:
            self.counters.rejected[reason] = self.counters.rejected.get(reason, 0) + 1

    def _record_error(self, reason: str, detail: str) -> None:
        self._errors.append({"timestamp": time.time(), "reason": reason, "detail": detail[:200]})

    def _reject(self, exc: ProtocolError, where: str, notify: bool = True) -> None:
        reason = str(exc.reason)
        self._count_rejection(reason)
        self._record_error(reason, f"{where}: {exc.detail}")
        self._log_rejections += 1
        n = self._log_rejections
        if n <= 10 or n % 1000 == 0:
            log.warning(
                "%s rejected a %s message (%s): %s [%d rejected so far]", TAG, where, reason, exc.detail, n
            )
        client = self._client
        if notify and client is not None and self._connected.is_set() and self._notices.take():
            notice = {
                "v": PROTOCOL_VERSION,
                "type": "error",
                "state": "online",
                "transitions": self.counters.accepted,
                "topic": where,
                "reason": reason,
                "detail": exc.detail,
                "device_id": exc.device_id,
                "rejected_total": sum(self.counters.rejected.values()),
            }
            client.publish(self.topics.status, dumps(notice), qos=0, retain=False)

    # ----------------------------------------------------------------------------- learner
    def _learner_loop(self) -> None:
        cfg = self.config
        next_status = time.monotonic() + cfg.status_interval
        next_save = time.monotonic() + cfg.save_interval
        echo_deadline = time.monotonic() + 5.0
        train_pending = getattr(self.model, "train_pending", None)
        try:
            while True:
                now = time.monotonic()
                publish_times = self._publish_due_times() if self._connected.is_set() else []
                due = min([next_status, next_save, *publish_times])
                stopping = self._stop.is_set()
                wait = 0.0 if stopping or self._status_now.is_set() else max(0.0, min(0.2, due - now))
                items = self._queue.get_many(wait, 4096)
                for item in items:
                    try:
                        if isinstance(item, _CommandItem):
                            self._run_command(item.command)
                        else:
                            self._learn_item(item)
                    except Exception:  # a bug must not stop learning from everything else
                        log.exception("%s failed to process a message; skipping it", TAG)
                        self._count_rejection("internal_error")
                    if stopping and self._journal is not None:
                        break  # what is still queued is in the journal and is replayed at the next start
                if train_pending is not None and not stopping:
                    train_pending(0.05)
                now = time.monotonic()
                if self._connected.is_set():
                    self._publish_due(now)
                    self._maybe_publish_model(now)
                    if now >= next_status or self._status_now.is_set():
                        self._status_now.clear()
                        self._publish_status(self._client)
                        next_status = now + cfg.status_interval
                    if echo_deadline and now >= echo_deadline:
                        echo_deadline = 0.0
                        self._check_publish_echo()
                journal_grew = (
                    self._journal is not None
                    and self._journal.appended_bytes - self._journal_bytes_at_save
                    > cfg.journal_checkpoint_bytes
                )
                if now >= next_save or journal_grew:
                    if self._changed_since_save or self._position != self._saved_position:
                        self._save()
                    next_save = now + cfg.save_interval
                if stopping and (not items or self._journal is not None):
                    break
        except Exception:
            log.exception("%s learner thread failed; saving what it has", TAG)
        finally:
            try:
                self._save()
            except Exception:
                log.exception("%s final checkpoint failed", TAG)
            self._learner_done.set()

    def _check_publish_echo(self) -> None:
        """Warn when our own status never came back: a broker ACL silently drops our publishes."""
        if self._echo_seen.is_set():
            return
        msg = (
            f"our status message on {self.topics.status} did not come back: the MQTT user may lack publish "
            f"permission on {self.config.topic_prefix}/exploration/#."
        )
        log.warning("%s %s", TAG, msg)
        self._record_error("publish_unconfirmed", msg)

    def _learn_item(self, item: _LogItem) -> None:
        accepted = 0
        for t in item.transitions:
            if self.dedup.seen(t.device_id, t.seq):
                self.counters.duplicates += 1
                continue
            try:
                self.model.learn(t)
            except ProtocolError as exc:
                exc.device_id = t.device_id
                self._reject(exc, "logs")
                continue
            accepted += 1
            self._replay.append(t)
            self._dirty_apps.add(t.app)
        if item.position is not None:
            self._position = item.position
        if accepted:
            self.counters.accepted += accepted
            self._last_update = time.time()
            self._changed_since_save = True

    def _replay_journal(self) -> None:
        assert self._journal is not None
        n = 0
        for payload, position in self._journal.replay(self._saved_position):
            try:
                transitions = parse_log_message(payload)
            except ProtocolError:
                continue
            self._learn_item(_LogItem(transitions, position, time.monotonic()))
            n += 1
        if n:
            log.info("%s Replayed %d journaled messages not yet in the checkpoint", TAG, n)
            self._save()

    # -------------------------------------------------------------------------- publishing
    def _publish_due_times(self) -> list[float]:
        return [self._next_publish.get(app, 0.0) for app in self._dirty_apps]

    def _publish_due(self, now: float) -> None:
        if not self._dirty_apps:
            return
        for app in list(self._dirty_apps):
            if now >= self._next_publish.get(app, 0.0):
                self._publish_qtable(app)

    def _publish_qtable(self, app: str) -> None:
        client = self._client
        if client is None:
            return
        t0 = time.monotonic()
        version = self._qtable_versions.get(app, 0) + 1
        payload = qtable_message(app, version, self.model.table(app), time.time())
        info = client.publish(self.topics.qtable(app), payload, qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return  # our outgoing queue is full or we are offline: stay dirty, try again later
        elapsed = time.monotonic() - t0
        self._qtable_versions[app] = version
        self._dirty_apps.discard(app)
        # Rate limit; big tables cost more to encode, so they are published less often.
        self._next_publish[app] = t0 + max(self.config.qtable_interval, 10.0 * elapsed)
        self.counters.published += 1

    def _maybe_publish_model(self, now: float) -> None:
        publish = getattr(self.model, "maybe_publish", None)
        if publish is not None and publish(self, now):
            self.counters.published += 2

    def publish_model_files(self, onnx_bytes: bytes, envelope: dict[str, Any]) -> None:
        """Publish the ONNX bytes, then the JSON envelope that names their sha256 (both retained)."""
        client = self._client
        if client is None:
            return
        client.publish(self.topics.model_onnx, onnx_bytes, qos=1, retain=True)
        client.publish(self.topics.model, dumps(envelope), qos=1, retain=True)

    def status(self) -> dict[str, Any]:
        counters = self.counters.as_dict()
        devices_online = sum(1 for d in self._devices.values() if d.get("state") != "offline")
        return {
            "v": PROTOCOL_VERSION,
            "type": "status",
            "state": "online",
            "server": self.config.client_id,
            "boot": self._boot,
            "mode": self.model.kind,
            "provider": getattr(self.model, "provider_name", "cpu"),
            "uptime_s": round(time.time() - self._started, 1),
            "transitions": self.counters.accepted,
            "counters": counters,
            **self.model.stats(),
            "devices": {
                "known": len(self._devices),
                "online": devices_online,
                "tracked_seq": len(self.dedup),
            },
            "queue": len(self._queue),
            "last_update": self._last_update,
            "last_save": self._last_save,
            "errors": list(self._errors)[-5:],
        }

    def _publish_status(self, client: mqtt.Client | None) -> None:
        if client is None:
            return
        client.publish(self.topics.status, dumps(self.status()), qos=1, retain=True)
        self.counters.published += 1

    def _publish_discovery(self, client: mqtt.Client) -> None:
        """Home Assistant MQTT discovery: two sensors appear without YAML."""
        node = "".join(c if c.isalnum() or c in "_-" else "_" for c in self.config.client_id)
        device = {
            "identifiers": [node],
            "name": "Tether ML training",
            "manufacturer": "Tether",
            "model": "Visual Mapper MQTT training server",
        }
        common = {
            "state_topic": self.topics.status,
            "availability_topic": self.topics.status,
            "availability_template": "{{ 'online' if value_json.state == 'online' else 'offline' }}",
            "device": device,
        }
        sensors = {
            "transitions": {
                "name": "Transitions learned",
                "value_template": "{{ value_json.transitions | default(0) }}",
                "unit_of_measurement": "transitions",
                "state_class": "measurement",
                "icon": "mdi:brain",
            },
            "status": {
                "name": "Training status",
                "value_template": "{{ value_json.state }}",
                "icon": "mdi:school",
            },
        }
        for key, extra in sensors.items():
            config = {**common, **extra, "unique_id": f"{node}_{key}"}
            topic = f"{self.config.ha_prefix}/sensor/{node}/{key}/config"
            client.publish(topic, dumps(config), qos=1, retain=True)
            self.counters.published += 1

    def _reply(self, command: Command, ok: bool, **extra: Any) -> None:
        client = self._client
        if client is None:
            return
        body = {
            "v": PROTOCOL_VERSION,
            "type": "reply",
            "state": "online",
            "transitions": self.counters.accepted,
            "command": command.command,
            "id": command.id,
            "ok": ok,
            **extra,
        }
        client.publish(self.topics.status, dumps(body), qos=1, retain=False)
        self.counters.published += 1

    # ----------------------------------------------------------------------------- commands
    def _run_command(self, command: Command) -> None:
        self.counters.commands += 1
        log.info("%s command %s received", TAG, command.command)
        try:
            if command.command == "status":
                self._reply(command, True, status=self.status())
            elif command.command == "reset":
                self._reply(command, True, **self.reset(command.app))
            elif command.command == "export":
                self._reply(command, True, **self.export(command.app))
            elif command.command == "train":
                self._reply(command, True, **self.train(command.epochs))
        except TetherError as exc:
            self._reply(command, False, error=str(exc))
        except Exception as exc:  # keep serving; the reply says what failed
            log.exception("%s command %s failed", TAG, command.command)
            self._reply(command, False, error=f"{exc.__class__.__name__}: {exc}")

    def reset(self, app: str | None = None) -> dict[str, Any]:
        """Clear the learned model (one app or all), keeping a backup of the checkpoint first."""
        self._save()
        backups = self.config.data_dir / "backups"
        backups.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = backups / f"{self.checkpoint_path.stem}-{stamp}-{secrets.token_hex(2)}.pt"
        shutil.copy2(self.checkpoint_path, backup)
        for old in sorted(backups.glob(f"{self.checkpoint_path.stem}-*.pt"))[:-10]:
            old.unlink(missing_ok=True)
        cleared = self.model.reset(app)
        if app is None:
            self._replay.clear()
        else:
            self._replay = deque(
                (t for t in self._replay if t.app != app), maxlen=self.config.replay_capacity
            )
        for name in cleared:
            self._dirty_apps.add(name)
            self._next_publish[name] = 0.0
        on_reset = getattr(self.model, "on_reset", None)
        if on_reset is not None:
            on_reset(self)
        self._changed_since_save = True
        self._save()
        log.info("%s reset %s; backup at %s", TAG, app or "all apps", backup)
        return {"cleared": cleared, "backup": str(backup)}

    def export(self, app: str | None = None) -> dict[str, Any]:
        """Write the Q-tables (and the DQN as ONNX) under data_dir/exports and publish them now."""
        out = self.config.data_dir / "exports"
        files: dict[str, str] = {}
        for name in [app] if app else self.model.apps():
            if name not in self.model.apps():
                raise MQTTServerError(
                    f"no Q-table for app '{name}' yet; export an app that has sent transitions."
                )
            path = out / f"qtable-{name}.json"
            text = qtable_message(
                name, self._qtable_versions.get(name, 0), self.model.table(name), time.time()
            )
            atomic_write_text(path, text.decode("utf-8"))
            files[str(path)] = hashlib.sha256(text).hexdigest()
            if self._client is not None:
                self._publish_qtable(name)
        extra: dict[str, Any] = {}
        export_model = getattr(self.model, "export", None)
        if export_model is not None:
            extra = export_model(self, out)
        self._publish_status(self._client)
        return {"files": files, **extra}

    def train(self, epochs: int = 1) -> dict[str, Any]:
        """Extra learning passes over the recent experience held in memory."""
        t0 = time.monotonic()
        n = self.model.replay(list(self._replay), epochs)
        self._dirty_apps.update(self.model.apps())
        self._changed_since_save = True
        return {"replayed": n, "epochs": epochs, "seconds": round(time.monotonic() - t0, 3)}

    # ------------------------------------------------------------------------------ checkpoint
    def _save(self) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "mode": self.model.kind,
            "models": {**self._other_models, self.model.kind: self.model.state_dict()},
            "dedup": self.dedup.state_dict(),
            "journal_position": list(self._position),
            "counters": self.counters.as_dict(),
            "qtable_versions": dict(self._qtable_versions),
            "saved_at": time.time(),
        }
        save_checkpoint(self.checkpoint_path, state)
        self._saved_position = self._position
        self._changed_since_save = False
        self._last_save = time.time()
        if self._journal is not None:
            self._journal_bytes_at_save = self._journal.appended_bytes
            self._journal.drop_before(self._position[0])
        log.debug("%s checkpoint saved (%d transitions)", TAG, self.counters.accepted)

    def _load(self) -> None:
        if not self.checkpoint_path.exists():
            log.info("%s No checkpoint in %s; starting fresh", TAG, self.config.data_dir)
            return
        try:
            state = load_checkpoint(self.checkpoint_path)
        except CheckpointError as exc:
            raise MQTTServerError(
                f"{exc} Move it away (or restore one from {self.config.data_dir / 'backups'}) to start fresh."
            ) from None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise MQTTServerError(
                f"{self.checkpoint_path} is not a Tether MQTT server checkpoint; point --data-dir elsewhere."
            )
        models = dict(state.get("models", {}))
        mine = models.pop(self.model.kind, None)
        self._other_models = models
        if mine is not None:
            self.model.load_state_dict(mine)
        elif models:
            log.info(
                "%s checkpoint holds a %s model; starting a fresh %s", TAG, ", ".join(models), self.model.kind
            )
        self.dedup.load_state_dict(state.get("dedup", {}))
        pos = state.get("journal_position", [0, 0])
        self._position = self._saved_position = (int(pos[0]), int(pos[1]))
        c = state.get("counters", {})
        for name in ("received", "transitions_received", "accepted", "duplicates", "published", "commands"):
            setattr(self.counters, name, int(c.get(name, 0)))
        self.counters.rejected = {str(k): int(v) for k, v in c.get("rejected", {}).items()}
        self._qtable_versions = {str(k): int(v) for k, v in state.get("qtable_versions", {}).items()}
        self._dirty_apps.update(self.model.apps())  # republish what we know after a restart
        log.info(
            "%s Loaded checkpoint: %d transitions learned, %s",
            TAG,
            self.counters.accepted,
            ", ".join(f"{k} {v}" for k, v in self.model.stats().items()),
        )


# ------------------------------------------------------------------------------------------ DQN
def state_bucket(app: str, state: str, buckets: int) -> int:
    """The embedding row of a screen: sha256 of "<app>\\n<state>" (UTF-8), first 8 bytes as a
    big-endian unsigned integer, modulo `buckets`. Devices compute the same to feed the model."""
    digest = hashlib.sha256(f"{app}\n{state}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % buckets


class _QNet(torch.nn.Module):
    """Q-values for every action slot, from a hashed screen id (embedding) or a feature vector."""

    def __init__(self, mode: str, in_dim: int, n_actions: int, hidden: int = 64, embed: int = 32) -> None:
        super().__init__()
        self.mode = mode
        if mode == "hashed":
            self.embed: torch.nn.Module = torch.nn.Embedding(in_dim, embed)
            first = embed
        else:
            self.embed = torch.nn.Identity()
            first = in_dim
        self.body = torch.nn.Sequential(
            torch.nn.Linear(first, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, n_actions),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(x))


class DQNModel:
    """A small double DQN over all apps (with `--dqn`).

    Input: the device's `features` (and `next_features`) when it sends them, otherwise a learned
    embedding of the hashed screen id (`state_bucket`). The first transition fixes which; the
    other kind is then rejected (`features_mismatch`). Output: one Q-value per action slot; the
    action vocabulary grows as devices reveal buttons (up to `MAX_ACTIONS`), and targets only
    maximise over the actions the next screen offers."""

    kind = "dqn"
    MAX_ACTIONS = 256
    BUCKETS = 4096
    MAX_STATES_PER_APP = 10_000  # screens whose Q-values go out on qtable/<app>
    TRAIN_EVERY = 4
    MAX_DEBT = 2_000
    TARGET_SYNC = 250
    LR = 1e-3

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.provider_name = "cpu"
        self._coral_noted = False
        self._torch_gen = torch.Generator().manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self._fresh()

    def _fresh(self) -> None:
        self.mode: str | None = None
        self.in_dim = 0
        self.actions: list[str] = []
        self.action_index: dict[str, int] = {}
        self.known: dict[str, OrderedDict[str, tuple[Any, list[int]]]] = {}
        self.net: _QNet | None = None
        self.target: _QNet | None = None
        self.optim: torch.optim.Optimizer | None = None
        self.size = 0
        self.cursor = 0
        self.steps = 0
        self.updates = 0
        self._forgiven = 0
        self.published_updates = -1
        self.model_version = 0
        self.next_model_publish = 0.0
        self.last_loss = float("nan")
        self._buf: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------------------ setup
    def _init(self, mode: str, in_dim: int) -> None:
        self.mode, self.in_dim = mode, in_dim
        with torch.random.fork_rng():
            torch.manual_seed(self.config.seed)
            self.net = _QNet(mode, in_dim, self.MAX_ACTIONS)
        self.target = _QNet(mode, in_dim, self.MAX_ACTIONS)
        self.target.load_state_dict(self.net.state_dict())
        self.optim = torch.optim.Adam(self.net.parameters(), lr=self.LR)
        cap = self.config.replay_capacity
        x_shape: tuple[int, ...] = (cap,) if mode == "hashed" else (cap, in_dim)
        x_type = np.int64 if mode == "hashed" else np.float32
        self._buf = {
            "x": np.zeros(x_shape, x_type),
            "x2": np.zeros(x_shape, x_type),
            "a": np.zeros(cap, np.int64),
            "r": np.zeros(cap, np.float32),
            "done": np.zeros(cap, np.float32),
            "mask2": np.zeros((cap, self.MAX_ACTIONS), np.bool_),
        }

    def _encode(self, t: Transition) -> tuple[Any, Any]:
        if t.features is not None:
            if self.mode is None:
                self._init("features", len(t.features))
            if self.mode != "features" or len(t.features) != self.in_dim:
                raise ProtocolError(
                    Reason.FEATURES_MISMATCH, f"this DQN takes {self.mode} input of size {self.in_dim}"
                )
            if t.next_features is None or len(t.next_features) != self.in_dim:
                raise ProtocolError(Reason.FEATURES_MISMATCH, "next_features must match features in size")
            return np.asarray(t.features, np.float32), np.asarray(t.next_features, np.float32)
        if self.mode is None:
            self._init("hashed", self.BUCKETS)
        if self.mode != "hashed":
            raise ProtocolError(
                Reason.FEATURES_MISMATCH, f"this DQN takes feature vectors of size {self.in_dim}"
            )
        return state_bucket(t.app, t.state, self.in_dim), state_bucket(t.app, t.next_state, self.in_dim)

    def _action_ids(self, names: list[str]) -> list[int]:
        out = []
        for name in names:
            idx = self.action_index.get(name)
            if idx is None:
                if len(self.actions) >= self.MAX_ACTIONS:
                    raise ProtocolError(
                        Reason.ACTION_SPACE_FULL, f"the DQN knows {self.MAX_ACTIONS} actions already"
                    )
                idx = self.action_index[name] = len(self.actions)
                self.actions.append(name)
            out.append(idx)
        return out

    # ------------------------------------------------------------------------------ learning
    def learn(self, t: Transition) -> None:
        x, x2 = self._encode(t)
        (a,) = self._action_ids([t.action])
        nxt = self._action_ids(t.available_actions)
        apps = self.known
        if t.app not in apps and len(apps) >= self.config.max_apps:
            raise ProtocolError(Reason.TABLE_FULL, f"the server already tracks {self.config.max_apps} apps")
        states = apps.setdefault(t.app, OrderedDict())
        for s, inp, acts in ((t.state, x, [a]), (t.next_state, x2, nxt)):
            old = states.get(s)
            merged = sorted(set(old[1]) | set(acts)) if old else sorted(set(acts))
            states[s] = (inp, merged)
            states.move_to_end(s)
        while len(states) > self.MAX_STATES_PER_APP:
            states.popitem(last=False)
        i = self.cursor
        b = self._buf
        b["x"][i], b["x2"][i], b["a"][i], b["r"][i] = x, x2, a, t.reward
        b["done"][i] = 1.0 if t.done else 0.0
        b["mask2"][i] = False
        if nxt:
            b["mask2"][i, nxt] = True
        self.cursor = (i + 1) % self.config.replay_capacity
        self.size = min(self.size + 1, self.config.replay_capacity)
        self.steps += 1

    def train_pending(self, max_seconds: float) -> int:
        """Gradient steps owed (one per TRAIN_EVERY new transitions), within a time budget so that
        ingest never stalls behind training; a debt larger than MAX_DEBT is forgiven."""
        if self.net is None or self.size < self.config.batch_size:
            return 0
        owed = self.steps // self.TRAIN_EVERY - self.updates - self._forgiven
        if owed > self.MAX_DEBT:
            self._forgiven += owed - self.MAX_DEBT
            owed = self.MAX_DEBT
        done = 0
        deadline = time.monotonic() + max_seconds
        while done < owed and time.monotonic() < deadline:
            self._gradient_step()
            done += 1
        return done

    def _gradient_step(self) -> None:
        assert self.net is not None and self.target is not None and self.optim is not None
        b = self._buf
        idx = self.rng.integers(0, self.size, self.config.batch_size)
        x, x2 = torch.from_numpy(b["x"][idx]), torch.from_numpy(b["x2"][idx])
        a, r = torch.from_numpy(b["a"][idx]), torch.from_numpy(b["r"][idx])
        done, mask2 = torch.from_numpy(b["done"][idx]), torch.from_numpy(b["mask2"][idx])
        known = torch.zeros(self.MAX_ACTIONS, dtype=torch.bool)
        known[: len(self.actions)] = True
        # A next screen that offered no actions: maximise over every known action instead.
        mask2 = torch.where(mask2.any(1, keepdim=True), mask2, known.expand_as(mask2))
        with torch.no_grad():
            online = self.net(x2).masked_fill(~mask2, -1e9)
            best = online.argmax(1, keepdim=True)  # double DQN: the online net picks, the target rates
            q_next = self.target(x2).gather(1, best).squeeze(1)
            target = r + self.config.discount * (1.0 - done) * q_next
        q = self.net(x).gather(1, a.unsqueeze(1)).squeeze(1)
        loss = torch.nn.functional.smooth_l1_loss(q, target)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 10.0)
        self.optim.step()
        self.updates += 1
        self.last_loss = float(loss.detach())
        if self.updates % self.TARGET_SYNC == 0:
            self.target.load_state_dict(self.net.state_dict())

    def replay(self, transitions: list[Transition], epochs: int) -> int:
        if self.net is None or self.size < self.config.batch_size:
            return 0
        steps = min(5_000, max(1, epochs * self.size // self.config.batch_size))
        for _ in range(steps):
            self._gradient_step()
        return steps * self.config.batch_size

    # ------------------------------------------------------------------------------ views
    def apps(self) -> list[str]:
        return list(self.known)

    def table(self, app: str) -> dict[str, dict[str, float]]:
        """Network Q-values of the screens seen in `app`, for the actions each one offers."""
        states = self.known.get(app)
        if not states or self.net is None:
            return {}
        names = list(states)
        inputs = [states[s][0] for s in names]
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.int64 if self.mode == "hashed" else torch.float32)
        with torch.no_grad():
            q = self.net(x).numpy()
        return {
            s: {self.actions[a]: float(q[i, a]) for a in states[s][1]}
            for i, s in enumerate(names)
            if states[s][1]
        }

    def stats(self) -> dict[str, Any]:
        return {
            "apps": len(self.known),
            "states": sum(len(s) for s in self.known.values()),
            "entries": self.size,
            "actions": len(self.actions),
            "updates": self.updates,
            "loss": None if math.isnan(self.last_loss) else round(self.last_loss, 6),
        }

    def reset(self, app: str | None = None) -> list[str]:
        """One network serves every app, so a reset clears it all (a per-app reset only forgets
        which screens of that app to publish)."""
        if app is not None:
            self.known.pop(app, None)
            return [app]
        cleared = list(self.known)
        self._fresh()
        return cleared

    def on_reset(self, server: MLTrainingServer) -> None:
        if self.net is None and server._client is not None:
            # Clear the retained model so devices stop using the old one.
            server._client.publish(server.topics.model_onnx, b"", qos=1, retain=True)
            server._client.publish(server.topics.model, b"", qos=1, retain=True)

    # ------------------------------------------------------------------------------ export
    def export_onnx(self) -> tuple[bytes, dict[str, Any]]:
        """The ONNX bytes of the Q-network and the JSON envelope describing them."""
        if self.net is None:
            raise MQTTServerError("the DQN has not seen any transition yet; nothing to export.")
        hashed = self.mode == "hashed"
        name = "bucket" if hashed else "features"
        example = torch.zeros(1, dtype=torch.int64) if hashed else torch.zeros(1, self.in_dim)
        data = _export_onnx(self.net, example, name)
        self.model_version += 1
        input_spec: dict[str, Any] = {
            "name": name,
            "dtype": "int64" if hashed else "float32",
            "shape": ["batch"] if hashed else ["batch", self.in_dim],
        }
        if hashed:
            input_spec["hash"] = (
                "sha256(utf8(app + '\\n' + state)); first 8 bytes as a big-endian unsigned integer, "
                f"modulo {self.in_dim}"
            )
            input_spec["buckets"] = self.in_dim
        envelope = {
            "v": PROTOCOL_VERSION,
            "type": "model",
            "format": "onnx",
            "version": self.model_version,
            "topic_payload": "model/onnx",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "input": input_spec,
            "output": {"name": "q_values", "dtype": "float32", "shape": ["batch", self.MAX_ACTIONS]},
            "actions": list(self.actions),
            "updates": self.updates,
            "timestamp": time.time(),
        }
        return data, envelope

    def _check_runtime(self, envelope: dict[str, Any], path: Path) -> None:
        """Load the exported model on the chosen provider (ONNX Runtime DirectML for --use-npu;
        CPU with one log line when that is absent) and check it gives the network's Q-values."""
        from tether.export.runtime import load_runtime

        provider = self.config.provider
        if provider == "coral" and not self._coral_noted:
            self._coral_noted = True
            log.warning(
                "%s --use-coral: the Edge TPU runs TFLite models only; the DQN is exported as ONNX and runs "
                "on CPU",
                TAG,
            )
        runner = load_runtime(path, "cpu" if provider == "coral" else provider)
        self.provider_name = str(runner.provider)
        name = envelope["input"]["name"]
        sample: np.ndarray
        if self.mode == "hashed":
            sample = np.arange(4, dtype=np.int64) % self.in_dim
        else:
            sample = np.linspace(-1, 1, 4 * self.in_dim, dtype=np.float32).reshape(4, self.in_dim)
        got = np.asarray(runner.run_all({name: sample})["q_values"])
        assert self.net is not None
        with torch.no_grad():
            want = self.net(torch.as_tensor(sample)).numpy()
        if not np.allclose(got, want, atol=1e-4):
            diff = float(np.abs(got - want).max())
            log.warning("%s the exported ONNX model disagrees with the network (max diff %.2e)", TAG, diff)

    def export(self, server: MLTrainingServer, out: Path) -> dict[str, Any]:
        data, envelope = self.export_onnx()
        out.mkdir(parents=True, exist_ok=True)
        from tether.checkpoint import atomic_write_bytes

        atomic_write_bytes(out / "model.onnx", data)
        atomic_write_text(out / "model.json", dumps(envelope).decode())
        self._check_runtime(envelope, out / "model.onnx")
        server.publish_model_files(data, envelope)
        self.published_updates = self.updates
        return {
            "model": str(out / "model.onnx"),
            "sha256": envelope["sha256"],
            "model_version": self.model_version,
        }

    def maybe_publish(self, server: MLTrainingServer, now: float) -> bool:
        if self.net is None or self.updates == self.published_updates or now < self.next_model_publish:
            return False
        self.next_model_publish = now + self.config.model_interval
        self.export(server, self.config.data_dir / "exports")
        return True

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.net is None or self.target is None or self.optim is None:
            return {"mode": None}
        n = self.size
        return {
            "mode": self.mode,
            "in_dim": self.in_dim,
            "actions": list(self.actions),
            "net": self.net.state_dict(),
            "target": self.target.state_dict(),
            "optim": self.optim.state_dict(),
            "known": {
                app: [[s, torch.as_tensor(np.asarray(inp)), acts] for s, (inp, acts) in states.items()]
                for app, states in self.known.items()
            },
            "buffer": {k: torch.from_numpy(v[:n].copy()) for k, v in self._buf.items()},
            "cursor": self.cursor,
            "steps": self.steps,
            "updates": self.updates,
            "model_version": self.model_version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._fresh()
        if state.get("mode") is None:
            return
        self._init(str(state["mode"]), int(state["in_dim"]))
        assert self.net is not None and self.target is not None and self.optim is not None
        self.actions = [str(a) for a in state["actions"]]
        self.action_index = {a: i for i, a in enumerate(self.actions)}
        self.net.load_state_dict(state["net"])
        self.target.load_state_dict(state["target"])
        self.optim.load_state_dict(state["optim"])
        for app, rows in state["known"].items():
            states: OrderedDict[str, tuple[Any, list[int]]] = OrderedDict()
            for s, inp, acts in rows:
                value = int(inp) if self.mode == "hashed" else inp.numpy()
                states[str(s)] = (value, [int(a) for a in acts])
            self.known[str(app)] = states
        n = 0
        for k, v in state["buffer"].items():
            arr = v.numpy()
            n = min(len(arr), self.config.replay_capacity)
            self._buf[k][:n] = arr[:n]
        self.size = n
        self.cursor = int(state["cursor"]) % self.config.replay_capacity
        self.steps, self.updates = int(state["steps"]), int(state["updates"])
        self._forgiven = max(0, self.steps // self.TRAIN_EVERY - self.updates)
        self.model_version = int(state["model_version"])


def _export_onnx(module: torch.nn.Module, example: torch.Tensor, input_name: str) -> bytes:
    """ONNX bytes of a Q-network with a dynamic batch axis.

    Private rather than `tether.export.onnx.export_onnx`, which takes Box observations and adds
    an unmasked argmax output: this network takes an int64 screen bucket, and which actions are
    valid depends on the screen, so devices take the argmax over the actions they see."""
    module = copy.deepcopy(module).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            (example,),
            buf,  # type: ignore[arg-type]  # a file object works; the stub says path
            input_names=[input_name],
            output_names=["q_values"],
            dynamic_axes={input_name: {0: "batch"}, "q_values": {0: "batch"}},
            dynamo=False,
        )
    return buf.getvalue()
