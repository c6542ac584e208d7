"""Run history: a metrics-bus sink that records a training run in the store (runs + metrics)."""

from __future__ import annotations

import logging
import math
from typing import Any

from tether.metrics import METRICS_UPDATE, TRAINING_STATUS, Event
from tether.store.api import Store
from tether.store.writer import BackgroundWriter

log = logging.getLogger(__name__)

# Trainer status → store run status.
_FINAL_STATUS = {"finished": "completed", "stopped": "stopped", "error": "failed"}


def _scalars(data: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in data.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class RunHistorySink:
    """Starts the run on `started`, streams metric rows through a background writer (never blocking
    the trainer thread on disk), and finishes the run with its last metrics as the summary."""

    def __init__(self, store: Store, name: str, algorithm: str, env_id: str, config: dict[str, Any]) -> None:
        self.store = store
        self.name, self.algorithm, self.env_id, self.config = name, algorithm, env_id, config
        self.run_id: str | None = None
        self._writer: BackgroundWriter | None = None
        self._last: dict[str, float] = {}

    def __call__(self, event: Event) -> None:
        data = event["data"]
        if event["type"] == TRAINING_STATUS and data.get("status") == "started":
            self.run_id = self.store.runs.start(
                self.name,
                run_id=str(data["run_id"]),
                preset=self.name,
                algorithm=self.algorithm,
                env_id=self.env_id,
                config=self.config,
                run_dir=str(data.get("run_dir")),
            )
            self._writer = self.store.writer()
        elif event["type"] == METRICS_UPDATE and self._writer is not None and self.run_id is not None:
            self._last = _scalars(data)
            self._writer.log_metrics(self.run_id, int(data.get("step", 0)), self._last)
        elif event["type"] == TRAINING_STATUS and data.get("status") in _FINAL_STATUS and self.run_id:
            self.close()
            self.store.runs.finish(self.run_id, _FINAL_STATUS[data["status"]], self._last)

    def close(self) -> None:
        if self._writer is not None:
            if not self._writer.close():
                log.warning("run history: some metric rows were not written before shutdown")
            self._writer = None
