"""The service's job host: at most one active training job, plus the record of past runs.

A job is either *attached* (a `Trainer` the caller runs in its own thread, as `tether train
--serve` does) or *background* (started from the API: the manager builds a `Trainer` and runs it
in a daemon thread). One job at a time keeps the machine's cores for the learner and keeps the
dashboard's single set of charts unambiguous. All jobs of one manager share its `MetricsBus`, so a
dashboard stays subscribed across jobs.

The trainer thread is the only owner of the model: the manager only calls the trainer's
thread-safe controls (`request_stop`, `request_save`, `update_config`) and reads the bus.

Past runs are found by scanning the runs directory (`<runs>/<run id>/config.yaml`,
`metrics.jsonl`, `checkpoints/*.pt`, `final.pt`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Protocol

import yaml

from tether.errors import TetherError
from tether.metrics import METRICS_UPDATE, TRAINING_STATUS, Event, MetricsBus

log = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset({"stopped", "finished", "error"})
DEFAULT_PRESET = "lunabotics"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Reading a run's metrics never reads more than this many bytes from the end of its JSONL file.
TAIL_BYTE_CAP = 8 * 1024 * 1024


class JobConflict(TetherError):
    """The request does not fit the current job state (HTTP 409)."""


class RunNotFound(TetherError):
    """No run with that id (HTTP 404)."""


class SaveTimeout(TetherError):
    """The trainer did not reach a safe point in time to save (HTTP 503)."""


class TrainerLike(Protocol):
    """What the manager needs from `tether.trainer.Trainer`."""

    bus: MetricsBus
    run_dir: Path

    def run(self) -> Any: ...

    def request_stop(self) -> None: ...

    def request_save(self, timeout: float = 30.0) -> Path: ...

    def update_config(self, changes: dict[str, Any]) -> dict[str, Any]: ...


def live_keys_of(config: Any) -> list[str]:
    """The `training.*` keys the job's algorithm allows to change while it runs."""
    training = getattr(config, "training", None)
    keys = getattr(type(training), "LIVE_KEYS", ()) if training is not None else ()
    return sorted(k if k.startswith("training.") else f"training.{k}" for k in keys)


def config_as_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    return dict(config.model_dump(mode="json"))


def valid_run_id(run_id: str) -> bool:
    return bool(RUN_ID_PATTERN.match(run_id)) and ".." not in run_id


def tail_lines(path: Path, max_lines: int, byte_cap: int = TAIL_BYTE_CAP) -> list[str]:
    """The last `max_lines` non-empty lines of a file, reading backwards at most `byte_cap` bytes."""
    if max_lines <= 0:
        return []
    with path.open("rb") as fh:
        fh.seek(0, 2)
        end = fh.tell()
        pos = end
        buf = b""
        while pos > 0 and buf.count(b"\n") <= max_lines and end - pos < byte_cap:
            step = min(64 * 1024, pos, byte_cap - (end - pos))
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
    lines = buf.split(b"\n")
    if pos > 0:  # the first piece is a partial line
        lines = lines[1:]
    return [line.decode("utf-8", "replace") for line in lines if line.strip()][-max_lines:]


def read_events_tail(path: Path, max_lines: int) -> list[Event]:
    events: list[Event] = []
    if not path.is_file():
        return events
    for line in tail_lines(path, max_lines):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line left by a crash
        if isinstance(event, dict) and isinstance(event.get("data"), dict):
            events.append(event)
    return events


class JobManager:
    """Hosts at most one active job and knows the runs in `runs_dir`."""

    def __init__(
        self,
        runs_dir: Path,
        bus: MetricsBus | None = None,
        default_preset: str = DEFAULT_PRESET,
        stop_timeout: float = 60.0,
    ) -> None:
        self.runs_dir = Path(runs_dir)
        self.bus = bus if bus is not None else MetricsBus()
        self.default_preset = default_preset
        self.stop_timeout = stop_timeout
        self._lock = threading.RLock()
        self._trainer: TrainerLike | None = None
        self._thread: threading.Thread | None = None
        self._mode: str | None = None
        self._job_status = "idle"
        self._started_at: float | None = None
        self._job_error: str | None = None
        self.bus.add_sink(self._on_event)

    # -- the current job ---------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        # Runs inline on the trainer thread: keep it trivial.
        if event["type"] == TRAINING_STATUS:
            self._job_status = str(event["data"].get("status", self._job_status))
            if self._job_status == "error":
                self._job_error = str(event["data"].get("message") or event["data"].get("error") or "")

    @property
    def trainer(self) -> TrainerLike | None:
        return self._trainer

    def is_active(self) -> bool:
        with self._lock:
            if self._trainer is None:
                return False
            if self._mode == "background":
                return self._thread is not None and self._thread.is_alive()
            return self._job_status not in TERMINAL_STATUSES

    def _active_trainer(self, action: str) -> TrainerLike:
        with self._lock:
            if not self.is_active() or self._trainer is None:
                raise JobConflict(f"no job is running, so there is nothing to {action}; start one first.")
            return self._trainer

    def run_id(self) -> str | None:
        trainer = self._trainer
        if trainer is None:
            return None
        return str(getattr(trainer, "run_id", None) or Path(trainer.run_dir).name)

    def status(self) -> dict[str, Any]:
        with self._lock:
            trainer = self._trainer
            return {
                "status": self._job_status,
                "active": self.is_active(),
                "mode": self._mode,
                "run_id": self.run_id(),
                "algorithm": getattr(getattr(trainer, "config", None), "algorithm", None)
                if trainer
                else None,
                "started_at": self._started_at,
                "step": self.bus.latest.get("step"),
                "error": self._job_error,
            }

    def attach(self, trainer: TrainerLike) -> None:
        """Host a trainer that its caller runs (in the foreground); it must publish on our bus."""
        if trainer.bus is not self.bus:
            raise ValueError("the attached trainer must emit on the manager's MetricsBus")
        with self._lock:
            if self.is_active():
                raise JobConflict(f"job {self.run_id()} is still running; stop it before attaching another.")
            self._set_job(trainer, "attached", None)

    def _set_job(self, trainer: TrainerLike, mode: str, thread: threading.Thread | None) -> None:
        self._trainer = trainer
        self._mode = mode
        self._thread = thread
        self._job_status = "starting"
        self._job_error = None
        self._started_at = time.time()

    def start(
        self, preset: str | None = None, overrides: list[str] | None = None, steps: int | None = None
    ) -> str:
        """Build a job from a preset (names only: a request must not read files on the server) and
        run it in a background thread. Returns the run id."""
        from tether.config import ConfigError, load_config, preset_names
        from tether.trainer import Trainer

        preset = preset or self.default_preset
        with self._lock:
            if self.is_active():
                raise JobConflict(
                    f"job {self.run_id()} is already running; stop it first (POST /control/stop)."
                )
            names = preset_names()
            if preset not in names:
                raise ConfigError(f"unknown preset '{preset}'; choose one of: {', '.join(names)}.")
            all_overrides = list(overrides or [])
            if steps is not None:
                all_overrides.append(f"schedule.total_steps={int(steps)}")
            config, name = load_config(preset, all_overrides)
            run_dir = self._new_run_dir(name)
            self.bus.latest.clear()
            trainer = Trainer(config, run_dir, bus=self.bus)
            thread = threading.Thread(target=self._run_job, args=(trainer,), name="tether-job", daemon=True)
            self._set_job(trainer, "background", thread)
            thread.start()
            log.info("started job %s (preset %s) in %s", self.run_id(), preset, run_dir)
            return str(self.run_id())

    def _new_run_dir(self, name: str) -> Path:
        from tether.runs import new_run_dir

        # `name` can come from a request's overrides: keep it a plain directory name.
        safe = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_")[:64] or "job"
        return new_run_dir(safe, base=self.runs_dir)

    def _run_job(self, trainer: TrainerLike) -> None:
        try:
            trainer.run()
        except Exception as exc:  # the trainer reports its own errors; this is the last resort
            log.exception("job %s failed", getattr(trainer, "run_id", "?"))
            if self._job_status != "error":
                self.bus.emit(
                    TRAINING_STATUS,
                    {"status": "error", "run_id": self.run_id(), "message": f"{type(exc).__name__}: {exc}"},
                )

    def stop(self, wait: float = 0.0) -> str:
        """Ask the running job to stop; with `wait` > 0, wait that long for it to end."""
        trainer = self._active_trainer("stop")
        trainer.request_stop()
        if wait > 0:
            self.wait(wait)
        return str(self.run_id())

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the current job to end; True when it has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_active():
            thread = self._thread
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if thread is not None:
                thread.join(remaining if remaining is not None else None)
            else:
                time.sleep(0.05)
            if deadline is not None and time.monotonic() >= deadline:
                break
        return not self.is_active()

    def save(self, timeout: float = 30.0) -> Path:
        """Ask the trainer for a checkpoint now and return its path. Waits on a helper thread so
        that a job ending mid-request answers 409 at once instead of hanging until `timeout`."""
        trainer = self._active_trainer("save")
        result: Future[Path] = Future()

        def ask() -> None:
            try:
                result.set_result(Path(trainer.request_save(timeout=timeout)))
            except BaseException as exc:
                result.set_exception(exc)

        threading.Thread(target=ask, name="tether-save", daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return result.result(timeout=0.1)
            except FutureTimeout:
                pass
            except TetherError as exc:  # e.g. the trainer is not running (yet, or any more)
                raise JobConflict(f"cannot save now: {exc}") from None
            if not self.is_active() or self._trainer is not trainer:
                raise JobConflict(
                    "the job ended before it reached a point to save; its final checkpoint is final.pt."
                )
            if time.monotonic() > deadline:
                raise SaveTimeout(
                    f"the trainer did not reach a safe point to save within {timeout:g} s; try again."
                )

    def config(self) -> dict[str, Any]:
        trainer = self._trainer
        config = getattr(trainer, "config", None) if trainer is not None else None
        return {
            "run_id": self.run_id(),
            "active": self.is_active(),
            "config": config_as_dict(config),
            "live_keys": live_keys_of(config),
        }

    def update_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        trainer = self._active_trainer("reconfigure")
        return dict(trainer.update_config(changes))

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop a background job this manager started (attached ones belong to their caller)."""
        timeout = self.stop_timeout if timeout is None else timeout
        with self._lock:
            mine = self._mode == "background" and self.is_active()
            trainer = self._trainer
        if mine and trainer is not None:
            log.info("stopping job %s before the service exits", self.run_id())
            trainer.request_stop()
            if not self.wait(timeout):
                log.warning("job %s did not stop within %.0f s", self.run_id(), timeout)

    # -- past runs ---------------------------------------------------------------------------

    def _run_path(self, run_id: str) -> Path:
        if not valid_run_id(run_id):
            raise RunNotFound(f"no run '{run_id[:80]}'; run ids are directory names listed by GET /runs.")
        root = self.runs_dir.resolve()
        path = (root / run_id).resolve()
        if path.parent != root or not (path / "config.yaml").is_file():
            raise RunNotFound(f"no run '{run_id}'; run ids are directory names listed by GET /runs.")
        return path

    def list_runs(self) -> list[dict[str, Any]]:
        if not self.runs_dir.is_dir():
            return []
        runs = []
        for config_file in self.runs_dir.glob("*/config.yaml"):
            run_dir = config_file.parent
            if not valid_run_id(run_dir.name) or run_dir.is_symlink():
                continue
            try:
                runs.append(self._summary(run_dir, tail=200))
            except OSError as exc:
                log.warning("skipping run %s: %s", run_dir.name, exc)
        runs.sort(key=lambda r: r["created"], reverse=True)
        return runs

    def get_run(self, run_id: str, limit: int = 500) -> dict[str, Any]:
        path = self._run_path(run_id)
        summary = self._summary(path, tail=max(limit, 200))
        config, config_error = _read_config(path / "config.yaml")
        events = read_events_tail(path / "metrics.jsonl", max(limit, 200) * 2)
        metrics = [e for e in events if e.get("type") == METRICS_UPDATE][-limit:] if limit else []
        return {**summary, "config": config, "config_error": config_error, "metrics": metrics}

    def _summary(self, run_dir: Path, tail: int) -> dict[str, Any]:
        config, _ = _read_config(run_dir / "config.yaml")
        events = read_events_tail(run_dir / "metrics.jsonl", tail)
        status = next(
            (e["data"].get("status") for e in reversed(events) if e.get("type") == TRAINING_STATUS), None
        )
        last: dict[str, Any] = next(
            (e["data"] for e in reversed(events) if e.get("type") == METRICS_UPDATE), {}
        )
        active = self.is_active() and self.run_id() == run_dir.name
        training = (config or {}).get("training") if isinstance(config, dict) else None
        environment = (config or {}).get("environment") if isinstance(config, dict) else None
        return {
            "id": run_dir.name,
            "name": config.get("name") if isinstance(config, dict) else None,
            "algorithm": training.get("algorithm") if isinstance(training, dict) else None,
            "environment": environment.get("id") if isinstance(environment, dict) else None,
            "created": (run_dir / "config.yaml").stat().st_mtime,
            "status": "running" if active else (status or "unknown"),
            "active": active,
            "last_metrics": {k: v for k, v in last.items() if k != "episode_rewards"},
            "checkpoints": _checkpoints(run_dir),
        }


def _read_config(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return None, f"config.yaml could not be read ({type(exc).__name__})"
    if not isinstance(data, dict):
        return None, "config.yaml is not a mapping"
    return data, None


def _checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted((run_dir / "checkpoints").glob("*.pt")) if (run_dir / "checkpoints").is_dir() else []
    final = run_dir / "final.pt"
    if final.is_file():
        files.append(final)
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append({"path": f.relative_to(run_dir).as_posix(), "bytes": st.st_size, "modified": st.st_mtime})
    return out
