"""A background writer: the trainer hands batches over and moves on; a thread commits them.

Policy, in order of what a caller sees:

* `write_transitions` / `log_metrics` / `write_outcomes` validate and copy the data in the
  caller's thread (so the caller may reuse its buffers at once and bad input raises right there),
  then enqueue it and return a **batch id** (an increasing integer).
* The queue is bounded in rows (`max_queue_rows`). When it is full the call waits at most
  `block_s` (default 50 ms) for room, then **drops** the batch, counts it in
  `stats().dropped_batches/dropped_rows`, logs a warning (at most every 10 s) and returns `None`.
  The trainer is never held longer than `block_s`.
* The thread takes up to `max_batch_rows` rows of queued batches (waiting up to `linger_s` for
  more to gather) and writes them in **one transaction**. A batch is never split across
  transactions, so after any crash a batch is either entirely in the database or not at all.
* After the transaction commits, `on_commit(batch_ids)` is called (from the writer thread). Only
  then is a batch durable; ids passed to `on_commit` survive a crash of this process (and, on
  SQLite with `synchronous=FULL` / on PostgreSQL, of the machine).
* If a transaction fails, it is retried once, then each of its batches is tried on its own; a
  batch that still fails is counted in `failed_batches`, reported to `on_error(batch_ids, exc)`
  and logged, and the writer carries on (one poisoned batch never stops the others).
* `flush(timeout)` waits until everything submitted so far is committed or failed; `close()`
  flushes and stops the thread (also called at interpreter exit).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tether.store._util import utcnow
from tether.store.engine import StoreError
from tether.store.experience import (
    EncodedExperience,
    Outcome,
    _outcome_row,
    encode_experience,
    insert_experience,
    insert_outcomes,
    merge_encoded,
    merge_key,
)
from tether.store.runs import insert_metrics, metric_rows

if TYPE_CHECKING:
    from tether.algos.base import Transitions
    from tether.store.api import Store

log = logging.getLogger(__name__)

CommitCallback = Callable[[list[int]], None]
ErrorCallback = Callable[[list[int], BaseException], None]


@dataclass
class WriterStats:
    submitted_batches: int = 0
    committed_batches: int = 0
    committed_rows: int = 0
    dropped_batches: int = 0
    dropped_rows: int = 0
    failed_batches: int = 0
    failed_rows: int = 0
    queued_rows: int = 0
    transactions: int = 0
    last_error: str | None = None


@dataclass
class _Item:
    id: int
    kind: str  # "experience" | "metrics" | "outcomes"
    payload: Any
    rows: int
    queued_at: float


def _merged(items: list[_Item]) -> list[tuple[str, Any]]:
    """Consecutive batches of one kind (and, for experience, one source and layout) become one
    insert: one executemany / COPY per run instead of one per small batch."""
    out: list[tuple[str, Any]] = []
    run: list[_Item] = []

    def key(item: _Item) -> tuple[Any, ...]:
        return (item.kind, merge_key(item.payload)) if item.kind == "experience" else (item.kind,)

    def flush() -> None:
        if not run:
            return
        if run[0].kind == "experience":
            out.append(("experience", merge_encoded([i.payload for i in run])))
        else:
            out.append((run[0].kind, [row for i in run for row in i.payload]))
        run.clear()

    for item in items:
        if run and key(run[0]) != key(item):
            flush()
        run.append(item)
    flush()
    return out


class BackgroundWriter:
    """See the module docstring. Create with `store.writer(...)`; use as a context manager."""

    def __init__(
        self,
        store: Store,
        *,
        max_queue_rows: int = 262_144,
        max_batch_rows: int = 65_536,
        linger_s: float = 0.05,
        block_s: float = 0.05,
        on_commit: CommitCallback | None = None,
        on_error: ErrorCallback | None = None,
        before_commit: CommitCallback | None = None,
        retry_delay_s: float = 0.5,
    ) -> None:
        if max_queue_rows < 1 or max_batch_rows < 1:
            raise StoreError("max_queue_rows and max_batch_rows must be at least 1.")
        self._store = store
        self.max_queue_rows = max_queue_rows
        self.max_batch_rows = max_batch_rows
        self.linger_s = max(0.0, linger_s)
        self.block_s = max(0.0, block_s)
        self._on_commit = on_commit
        self._on_error = on_error
        # Called inside the transaction just before COMMIT (for tracing and crash tests).
        self._before_commit = before_commit
        self._retry_delay_s = retry_delay_s
        self._cv = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._ids = itertools.count(1)
        self._last_id = 0
        self._settled_through = 0
        self._closing = False
        self._stats = WriterStats()
        self._last_drop_warning = 0.0
        self._thread = threading.Thread(target=self._run, name="tether-store-writer", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)

    # -- producer side ----------------------------------------------------------------------

    def write_transitions(
        self,
        source: str,
        batch: Transitions,
        *,
        episode: int | Sequence[int] | np.ndarray = 0,
        step: int | Sequence[int] | np.ndarray = 0,
        extra: Mapping[str, Any] | None = None,
        include_extras: bool = False,
    ) -> int | None:
        """Queue a batch of transitions (arguments as `store.experience.write`)."""
        encoded: EncodedExperience = encode_experience(
            source, batch, episode=episode, step=step, extra=extra, include_extras=include_extras
        )
        return self._submit("experience", encoded, encoded.rows)

    def log_metrics(self, run_id: str, step: int, values: Mapping[str, Any]) -> int | None:
        """Queue one step's scalars for `metrics` (arguments as `store.runs.log_metrics`)."""
        rows = metric_rows(run_id, step, values, utcnow())
        return self._submit("metrics", rows, len(rows)) if rows else None

    def write_outcomes(self, outcomes: Sequence[Outcome]) -> int | None:
        """Queue finished-episode outcomes for `ml_episode_outcomes`."""
        rows = [_outcome_row(o) for o in outcomes]
        return self._submit("outcomes", rows, len(rows)) if rows else None

    def _submit(self, kind: str, payload: Any, rows: int) -> int | None:
        with self._cv:
            if self._closing:
                raise StoreError("The store writer is closed; open a new one with store.writer().")
            deadline = time.monotonic() + self.block_s
            while self._queue and self._stats.queued_rows + rows > self.max_queue_rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._stats.dropped_batches += 1
                    self._stats.dropped_rows += rows
                    now = time.monotonic()
                    if now - self._last_drop_warning > 10.0:
                        self._last_drop_warning = now
                        log.warning(
                            "Store writer queue full (%d rows): dropped a %d-row batch (%d dropped so far); "
                            "the database is slower than the trainer",
                            self._stats.queued_rows,
                            rows,
                            self._stats.dropped_batches,
                        )
                    return None
                self._cv.wait(remaining)
            item = _Item(next(self._ids), kind, payload, rows, time.monotonic())
            self._last_id = item.id
            self._queue.append(item)
            self._stats.queued_rows += rows
            self._stats.submitted_batches += 1
            self._cv.notify_all()
            return item.id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every batch submitted so far is committed (or failed); False on timeout."""
        with self._cv:
            target = self._last_id
            return (
                self._cv.wait_for(
                    lambda: self._settled_through >= target or not self._thread.is_alive(), timeout
                )
                and self._settled_through >= target
            )

    def close(self, timeout: float | None = 30.0) -> bool:
        """Commit what is queued, stop the thread; True when everything was settled in time."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)
        atexit.unregister(self._atexit)
        with self._cv:
            return not self._thread.is_alive() and self._settled_through >= self._last_id

    def _atexit(self) -> None:
        self.close(timeout=10.0)

    def stats(self) -> WriterStats:
        with self._cv:
            return WriterStats(**vars(self._stats))

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writer thread ----------------------------------------------------------------------

    def _take(self) -> list[_Item] | None:
        with self._cv:
            while not self._queue and not self._closing:
                self._cv.wait()
            if not self._queue:
                return None
            deadline = self._queue[0].queued_at + self.linger_s
            while not self._closing and self._stats.queued_rows < self.max_batch_rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            group = [self._queue.popleft()]
            rows = group[0].rows
            while self._queue and rows + self._queue[0].rows <= self.max_batch_rows:
                item = self._queue.popleft()
                group.append(item)
                rows += item.rows
            self._stats.queued_rows -= rows
            self._cv.notify_all()  # room for producers waiting in _submit
            return group

    def _run(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            try:
                self._write_group(group)
            except BaseException as exc:  # never let the thread die with batches unsettled
                log.exception("Store writer failed unexpectedly")
                self._failed(group, exc)
            with self._cv:
                self._settled_through = group[-1].id
                self._cv.notify_all()

    def _transaction(self, items: list[_Item]) -> None:
        with self._store.write_tx() as conn:
            for kind, payload in _merged(items):
                if kind == "experience":
                    insert_experience(conn, payload)
                elif kind == "metrics":
                    insert_metrics(conn, payload)
                else:
                    insert_outcomes(conn, payload)
            if self._before_commit is not None:
                self._before_commit([i.id for i in items])

    def _write_group(self, group: list[_Item]) -> None:
        error: Exception | None = None
        for attempt in range(2):
            try:
                self._transaction(group)
            except Exception as exc:
                # Retrying after a connection lost during COMMIT itself may store a batch twice;
                # a batch reported committed is never lost.
                error = exc
                log.warning(
                    "Store write of %d batch(es) failed (attempt %d): %s", len(group), attempt + 1, exc
                )
                if attempt == 0:
                    time.sleep(self._retry_delay_s)
                continue
            self._committed(group)
            return
        assert error is not None
        if len(group) == 1:
            self._failed(group, error)
            return
        for item in group:  # isolate the batch that cannot be written
            try:
                self._transaction([item])
            except Exception as exc:
                self._failed([item], exc)
            else:
                self._committed([item])

    def _committed(self, items: list[_Item]) -> None:
        ids = [i.id for i in items]
        with self._cv:
            self._stats.committed_batches += len(items)
            self._stats.committed_rows += sum(i.rows for i in items)
            self._stats.transactions += 1
        if self._on_commit is not None:
            try:
                self._on_commit(ids)
            except Exception:
                log.exception("Store writer on_commit callback failed")

    def _failed(self, items: list[_Item], exc: BaseException) -> None:
        ids = [i.id for i in items]
        with self._cv:
            self._stats.failed_batches += len(items)
            self._stats.failed_rows += sum(i.rows for i in items)
            self._stats.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("Store writer gave up on batch(es) %s: %s", ids, exc)
        if self._on_error is not None:
            try:
                self._on_error(ids, exc)
            except Exception:
                log.exception("Store writer on_error callback failed")
