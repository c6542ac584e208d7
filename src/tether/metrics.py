"""A thread-safe metrics bus and its sinks (TensorBoard, JSONL).

The trainer thread emits events; sinks run inline (they are cheap, and they are the record), while
viewers such as dashboard WebSockets get bounded queues that drop their oldest event when the
viewer lags, so a slow or dead browser never slows training.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Event = dict[str, Any]
Sink = Callable[[Event], None]

# Event kinds used across Tether.
METRICS_UPDATE = "metrics_update"
TRAINING_STATUS = "training_status"
CONFIG_UPDATED = "config_updated"


class Subscription:
    """A viewer's bounded queue of events. `notify` (if given) is called from the emitting thread
    after each put, e.g. `lambda: loop.call_soon_threadsafe(flag.set)` for an asyncio consumer."""

    def __init__(self, bus: MetricsBus, maxsize: int, notify: Callable[[], None] | None) -> None:
        self._bus = bus
        self._queue: deque[Event] = deque(maxlen=maxsize)
        self._cond = threading.Condition()
        self._notify = notify
        self.dropped = 0
        self.closed = False

    def put(self, event: Event) -> None:
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(event)
            self._cond.notify_all()
        if self._notify is not None:
            try:
                self._notify()
            except RuntimeError:  # the consumer's event loop has closed
                self.close()

    def get(self, timeout: float | None = None) -> Event | None:
        """Block until an event is there (or `timeout` passes) and return it, else None."""
        with self._cond:
            if not self._queue:
                self._cond.wait(timeout)
            return self._queue.popleft() if self._queue else None

    def drain(self) -> list[Event]:
        with self._cond:
            events = list(self._queue)
            self._queue.clear()
            return events

    def close(self) -> None:
        self.closed = True
        self._bus.unsubscribe(self)


class MetricsBus:
    """Fan-out of training events to sinks, history and viewers."""

    def __init__(self, history: int = 2000) -> None:
        self._lock = threading.Lock()
        self._history: deque[Event] = deque(maxlen=history)
        self._subscribers: list[Subscription] = []
        self._sinks: list[Sink] = []
        self._seq = 0
        self.latest: dict[str, Any] = {}
        self.status: str = "idle"

    def add_sink(self, sink: Sink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def emit(self, kind: str, data: dict[str, Any]) -> Event:
        with self._lock:
            self._seq += 1
            event: Event = {"type": kind, "seq": self._seq, "time": time.time(), "data": data}
            self._history.append(event)
            if kind == METRICS_UPDATE:
                self.latest.update(data)
            elif kind == TRAINING_STATUS:
                self.status = str(data.get("status", self.status))
            sinks = list(self._sinks)
            subscribers = list(self._subscribers)
        for sink in sinks:
            try:
                sink(event)
            except Exception:  # a broken sink must not stop training
                log.exception("metrics sink %r failed; removing it", sink)
                self.remove_sink(sink)
        for sub in subscribers:
            sub.put(event)
        return event

    def history(self, kind: str | None = None, limit: int | None = None) -> list[Event]:
        with self._lock:
            events = [e for e in self._history if kind is None or e["type"] == kind]
        return events[-limit:] if limit else events

    def subscribe(
        self, maxsize: int = 1000, replay: bool = True, notify: Callable[[], None] | None = None
    ) -> Subscription:
        """A new viewer queue; with `replay` it starts with the recent history so charts are full."""
        sub = Subscription(self, maxsize, notify)
        with self._lock:
            if replay:
                for event in list(self._history)[-maxsize:]:
                    sub._queue.append(event)
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class JsonlSink:
    """Appends every event as one JSON line; the durable record of a run."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, event: Event) -> None:
        self._file.write(json.dumps(event, allow_nan=False, default=float) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Writes the numeric `section/name` keys of `metrics_update` events as scalars at `data['step']`."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, event: Event) -> None:
        if event["type"] != METRICS_UPDATE:
            return
        data = event["data"]
        step = int(data.get("step", 0))
        for key, value in data.items():
            if "/" in key and _finite_number(value):
                self._writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


def read_jsonl(path: Path) -> list[Event]:
    """Read a metrics JSONL file, skipping a torn last line left by a crash."""
    events: list[Event] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events
