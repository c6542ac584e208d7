"""A simulated Visual Mapper Android explorer: N apps × M devices speaking the MQTT protocol.

Each app is a random screen graph: screens are states, buttons are actions, some screens are
goals (the episode ends there). Every non-goal screen can reach a goal. A device explores with
ε-greedy on the Q-values the server publishes (so learning shows up as shorter episodes), gets
+1 at a goal, a small bonus the first time it sees a screen, and a small cost per step.

`QTableWatcher` follows the retained `qtable/<app>` topics; `AppGraph.evaluate` measures the
greedy policy of a Q-table against the true shortest paths.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tether.ingest.mqtt_protocol import DEFAULT_PREFIX, PROTOCOL_VERSION, Topics, dumps

log = logging.getLogger(__name__)

_BUTTONS = [
    "Settings", "Back", "Next", "Search", "Profile", "Menu", "OK", "Cancel", "Home", "Share",
    "Details", "Help", "Cart", "Filter", "More", "Edit", "Save", "Open", "Close", "Login",
]  # fmt: skip

GOAL_REWARD = 1.0
NEW_SCREEN_REWARD = 0.05
STEP_REWARD = -0.01


@dataclass
class AppGraph:
    """One app's screens, buttons (action → next screen) and goal screens."""

    package: str
    edges: dict[str, dict[str, str]]
    goals: frozenset[str]

    @property
    def screens(self) -> list[str]:
        return list(self.edges)

    def actions(self, screen: str) -> list[str]:
        return list(self.edges[screen])

    def distances(self) -> dict[str, int]:
        """Fewest taps from each screen to a goal (BFS over reversed edges); goals are 0."""
        reverse: dict[str, set[str]] = {s: set() for s in self.edges}
        for s, acts in self.edges.items():
            for nxt in acts.values():
                reverse[nxt].add(s)
        dist = dict.fromkeys(self.goals, 0)
        frontier = deque(self.goals)
        while frontier:
            s = frontier.popleft()
            for prev in reverse[s]:
                if prev not in dist:
                    dist[prev] = dist[s] + 1
                    frontier.append(prev)
        return dist

    def starts(self) -> list[str]:
        dist = self.distances()
        return [s for s in self.edges if s not in self.goals and s in dist]

    def greedy_steps(self, q: dict[str, dict[str, float]], start: str, max_steps: int) -> int | None:
        """Taps the greedy policy of `q` needs from `start` to a goal (None if it never gets there).

        Ties go to the first listed action, unknown actions count as 0 — what a device does."""
        screen, steps = start, 0
        while screen not in self.goals:
            if steps >= max_steps:
                return None
            row = q.get(screen, {})
            acts = self.actions(screen)
            best = max(acts, key=lambda a: row.get(a, 0.0))
            screen = self.edges[screen][best]
            steps += 1
        return steps

    def evaluate(self, q: dict[str, dict[str, float]], tolerance: float = 1.2) -> float:
        """Fraction of start screens from which greedy reaches a goal in ≤ tolerance × shortest path."""
        dist = self.distances()
        starts = self.starts()
        good = 0
        for s in starts:
            n = self.greedy_steps(q, s, max_steps=4 * len(self.edges))
            if n is not None and n <= tolerance * dist[s]:
                good += 1
        return good / len(starts) if starts else 1.0


def random_app(
    package: str,
    rng: random.Random,
    screens: tuple[int, int] = (10, 18),
    buttons: tuple[int, int] = (2, 4),
    goals: int = 1,
) -> AppGraph:
    """A random app in which every non-goal screen can reach a goal.

    Screens are taken in random order; each gets one button to the goal or to a screen before it
    (so a path exists by induction), then a few more buttons to random screens."""
    n = rng.randint(*screens)
    names = [f"{package.rsplit('.', 1)[-1]}:screen{i:02d}" for i in range(n)]
    goal_names = names[-goals:]
    others = names[:-goals]
    rng.shuffle(others)
    edges: dict[str, dict[str, str]] = {g: {} for g in goal_names}
    placed: list[str] = list(goal_names)
    for s in others:
        labels = rng.sample(_BUTTONS, rng.randint(*buttons))
        acts = {f"tap:{labels[0]}": rng.choice(placed)}
        for label in labels[1:]:
            acts[f"tap:{label}"] = rng.choice(names)
        items = list(acts.items())
        rng.shuffle(items)  # the path button is not always the first one
        edges[s] = dict(items)
        placed.append(s)
    ordered = {name: edges[name] for name in names}
    return AppGraph(package=package, edges=ordered, goals=frozenset(goal_names))


def make_apps(n: int, seed: int = 0, screens: tuple[int, int] = (10, 18)) -> list[AppGraph]:
    rng = random.Random(seed)
    return [random_app(f"com.example.sim{i}", rng, screens=screens) for i in range(n)]


class QTableWatcher:
    """Keeps the latest Q-table of each app from the retained `qtable/<app>` topics."""

    def __init__(self, client: mqtt.Client, topics: Topics) -> None:
        self.topics = topics
        self.tables: dict[str, dict[str, dict[str, float]]] = {}
        self.versions: dict[str, int] = {}
        self.received = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        client.message_callback_add(topics.qtable_filter, self._on_qtable)

    def _on_qtable(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        app = self.topics.app_of_qtable_topic(msg.topic)
        if app is None:
            return
        try:
            data = json.loads(msg.payload)
            table = data["q"]
            version = int(data["version"])
        except (ValueError, KeyError, TypeError):
            return  # an empty retained message (cleared table) or a foreign publisher
        with self._cond:
            self.tables[app] = table
            self.versions[app] = version
            self.received += 1
            self._cond.notify_all()

    def table(self, app: str) -> dict[str, dict[str, float]]:
        with self._lock:
            return self.tables.get(app, {})

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Wait until predicate(watcher) is true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


def set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Small MQTT packets should leave at once (Nagle would hold a PUBLISH behind an unacked one)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    tls: bool = False,
    tls_ca: str | None = None,
    tls_insecure: bool = False,
) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.on_socket_open = set_nodelay
    if username:
        client.username_pw_set(username, password)
    if tls:
        client.tls_set(
            ca_certs=tls_ca or None, cert_reqs=ssl.CERT_NONE if tls_insecure else ssl.CERT_REQUIRED
        )
        if tls_insecure:
            client.tls_insecure_set(True)
    return client


def connect(client: mqtt.Client, broker: str, port: int, timeout: float = 10.0) -> None:
    """Connect and wait for a successful CONNACK; raises ConnectionError with the broker's reason."""
    done = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        result["reason"] = reason
        done.set()

    client.on_connect = on_connect
    client.connect(broker, port, keepalive=30)
    client.loop_start()
    if not done.wait(timeout) or result["reason"].is_failure:
        client.loop_stop()
        raise ConnectionError(f"MQTT connect to {broker}:{port} failed: {result.get('reason', 'no answer')}")


@dataclass
class _Device:
    device_id: str
    rng: random.Random
    client: mqtt.Client
    seq: int = 0
    episode: int = 0
    step: int = 0
    app: AppGraph | None = None
    screen: str = ""
    seen: dict[str, set[str]] = field(default_factory=dict)
    pending: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0
    acked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class SimStats:
    transitions: int = 0
    messages: int = 0
    episodes: int = 0
    goals: int = 0
    episode_lengths: deque[int] = field(default_factory=lambda: deque(maxlen=500))


class AndroidSimulator:
    """M simulated devices exploring N apps. Each device has its own MQTT connection (QoS 1); one
    extra connection watches the published Q-tables for all of them."""

    def __init__(
        self,
        broker: str = "localhost",
        port: int = 1883,
        apps: int | list[AppGraph] = 2,
        devices: int = 2,
        seed: int = 0,
        epsilon: float = 0.2,
        batch: int = 1,
        rate: float = 0.0,
        topic_prefix: str = DEFAULT_PREFIX,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_insecure: bool = False,
        max_episode_steps: int = 30,
        device_prefix: str = "sim-device",
        max_unacked: int = 2000,
        watch: bool = True,
    ) -> None:
        self.broker, self.port = broker, port
        self.apps = apps if isinstance(apps, list) else make_apps(apps, seed)
        self.n_devices = devices
        self.seed = seed
        self.epsilon = epsilon
        self.batch = max(1, batch)
        self.rate = rate
        self.topics = Topics(topic_prefix)
        self._auth: dict[str, Any] = {
            "username": username,
            "password": password,
            "tls": tls,
            "tls_ca": tls_ca,
            "tls_insecure": tls_insecure,
        }
        self.max_episode_steps = max_episode_steps
        self.device_prefix = device_prefix
        self.max_unacked = max_unacked
        self.watch = watch  # follow the published Q-tables (off: pure random exploration, less load)
        self.stats = SimStats()
        self.devices: list[_Device] = []
        self.watcher: QTableWatcher | None = None
        self._observer: mqtt.Client | None = None

    # ---------------------------------------------------------------------------- connection
    def connect(self) -> None:
        if self.watch:
            observer = make_client(f"{self.device_prefix}-observer-{self.seed}", **self._auth)
            self.watcher = QTableWatcher(observer, self.topics)

            def subscribe(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
                c.subscribe(self.topics.qtable_filter, qos=1)

            connect(observer, self.broker, self.port)
            observer.on_connect = subscribe
            observer.subscribe(self.topics.qtable_filter, qos=1)
            self._observer = observer
        for i in range(self.n_devices):
            device_id = f"{self.device_prefix}-{i:03d}"
            client = make_client(f"tether-sim-{device_id}", **self._auth)
            client.max_inflight_messages_set(1000)
            client.will_set(
                self.topics.device_status(device_id),
                dumps({"v": PROTOCOL_VERSION, "device_id": device_id, "state": "offline"}),
                qos=1,
                retain=True,
            )
            dev = _Device(device_id, random.Random(self.seed * 1000 + i), client)
            client.on_publish = self._make_on_publish(dev)
            connect(client, self.broker, self.port)
            client.publish(
                self.topics.device_status(device_id),
                dumps({"v": PROTOCOL_VERSION, "device_id": device_id, "state": "exploring"}),
                qos=1,
                retain=True,
            )
            self.devices.append(dev)

    @staticmethod
    def _make_on_publish(dev: _Device) -> Any:
        def on_publish(c: mqtt.Client, u: Any, mid: int, reason: Any, props: Any) -> None:
            with dev.lock:
                dev.acked += 1

        return on_publish

    def close(self, flush_timeout: float = 30.0) -> None:
        """Send what is pending, wait for the broker's acknowledgements, mark devices offline."""
        for dev in self.devices:
            self._flush_pending(dev)
        self.flush(flush_timeout)
        for dev in self.devices:
            info = dev.client.publish(
                self.topics.device_status(dev.device_id),
                dumps({"v": PROTOCOL_VERSION, "device_id": dev.device_id, "state": "offline"}),
                qos=1,
                retain=True,
            )
            info.wait_for_publish(timeout=5.0)
            dev.client.disconnect()
            dev.client.loop_stop()
        if self._observer is not None:
            self._observer.disconnect()
            self._observer.loop_stop()
        self.devices.clear()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the broker acknowledged every log message sent so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(d.acked >= d.sent for d in self.devices):
                return True
            time.sleep(0.01)
        return False

    # --------------------------------------------------------------------------------- acting
    def _choose(self, dev: _Device, app: AppGraph, screen: str) -> str:
        acts = app.actions(screen)
        if dev.rng.random() < self.epsilon or self.watcher is None:
            return dev.rng.choice(acts)
        row = self.watcher.tables.get(app.package, {}).get(screen, {})
        best = max(row.get(a, 0.0) for a in acts)
        ties = [a for a in acts if row.get(a, 0.0) == best]
        return dev.rng.choice(ties)

    def _begin_episode(self, dev: _Device) -> None:
        dev.app = dev.rng.choice(self.apps)
        # Deep links: episodes start anywhere, as when a user opens the app from a notification.
        dev.screen = dev.rng.choice(dev.app.starts())
        dev.step = 0
        dev.seen.setdefault(dev.app.package, set()).add(dev.screen)

    def step_device(self, dev: _Device) -> dict[str, Any]:
        """One tap on one device; returns the transition (also queued for publishing)."""
        if dev.app is None:
            self._begin_episode(dev)
        app = dev.app
        assert app is not None
        screen = dev.screen
        action = self._choose(dev, app, screen)
        nxt = app.edges[screen][action]
        seen = dev.seen[app.package]
        reward = STEP_REWARD
        if nxt not in seen:
            seen.add(nxt)
            reward += NEW_SCREEN_REWARD
        done = nxt in app.goals
        if done:
            reward += GOAL_REWARD
        dev.step += 1
        truncated = not done and dev.step >= self.max_episode_steps
        dev.seq += 1
        t = {
            "device_id": dev.device_id,
            "app": app.package,
            "episode": dev.episode,
            "step": dev.step - 1,
            "seq": dev.seq,
            "state": screen,
            "action": action,
            "reward": round(reward, 6),
            "next_state": nxt,
            "done": done,
            "truncated": truncated,
            "available_actions": app.actions(nxt),
            "timestamp": time.time(),
        }
        self.stats.transitions += 1
        if done or truncated:
            self.stats.episodes += 1
            self.stats.goals += int(done)
            self.stats.episode_lengths.append(dev.step)
            dev.episode += 1
            dev.app = None
        else:
            dev.screen = nxt
        dev.pending.append(t)
        if len(dev.pending) >= self.batch:
            self._flush_pending(dev)
        return t

    def _flush_pending(self, dev: _Device) -> None:
        if not dev.pending:
            return
        if len(dev.pending) == 1 and self.batch == 1:
            payload = dumps({"v": PROTOCOL_VERSION, **dev.pending[0]})
        else:
            payload = dumps({"v": PROTOCOL_VERSION, "batch": dev.pending})
        dev.pending = []
        self.publish_raw(dev, payload)
        self.stats.messages += 1

    def publish_raw(self, dev: _Device, payload: bytes) -> None:
        """Publish a log payload with QoS 1, waiting while too many are unacknowledged."""
        while dev.sent - dev.acked >= self.max_unacked:
            time.sleep(0.001)
        with dev.lock:
            dev.sent += 1
        info = dev.client.publish(self.topics.logs, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            log.warning("publish failed: %s", mqtt.error_string(info.rc))

    def run(self, steps: int | None = None, stop: threading.Event | None = None) -> SimStats:
        """Step every device `steps` times (forever if None), at `rate` taps/s per device (0: flat out)."""
        if not self.devices:
            self.connect()
        period = 1.0 / self.rate if self.rate > 0 else 0.0
        n = 0
        next_tick = time.monotonic()
        while steps is None or n < steps:
            if stop is not None and stop.is_set():
                break
            for dev in self.devices:
                self.step_device(dev)
            n += 1
            if period:
                next_tick += period
                delay = next_tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        for dev in self.devices:
            self._flush_pending(dev)
        return self.stats

    def evaluate(self, tolerance: float = 1.2) -> dict[str, float]:
        """Greedy success rate per app from the latest published Q-tables."""
        if self.watcher is None:
            return {}
        return {app.package: app.evaluate(self.watcher.table(app.package), tolerance) for app in self.apps}
