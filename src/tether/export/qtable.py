"""Export of a tabular Q-learning run as its table: the `tether-qtable` JSON document that
`QTableLearner.to_json()` writes, with the usual sidecar.

A table has no graph to compare with PyTorch; the check is that the file, read back through the
same validating parser a device-side import uses, gives exactly the learner's table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tether import __version__
from tether.algos.qtable import QTableError, QTableLearner, parse_qtable_json
from tether.checkpoint import atomic_write_text
from tether.export.runtime import SIDECAR_FORMAT, ExportError, sha256_file, sidecar_path

QTABLE_FORMAT = "qtable-json"


def export_qtable_json(learner: Any, path: Path, metadata: dict[str, Any] | None = None) -> Any:
    """Write `learner`'s table to `path` and its sidecar next to it; returns the `ExportResult`."""
    from tether.export.onnx import SIDECAR_VERSION, ExportResult, update_sidecar

    if not isinstance(learner, QTableLearner):
        raise ExportError(
            f"--format {QTABLE_FORMAT} exports tabular Q-learning runs, not a {type(learner).__name__}; "
            "export this run as onnx."
        )
    document = learner.to_json()
    try:
        text = json.dumps(document, allow_nan=False)
    except ValueError:
        raise ExportError("the Q-table holds a non-finite value; it cannot be written as JSON.") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")
    try:
        read_back = parse_qtable_json(json.loads(path.read_text()))
    except (QTableError, ValueError) as exc:
        raise ExportError(f"{path.name} does not read back as a Q-table: {exc}") from None
    if read_back != learner.table:
        raise ExportError(f"{path.name} does not read back as the learner's table; nothing was published.")
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "sidecar_version": SIDECAR_VERSION,
        "model_format": QTABLE_FORMAT,
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "tether_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_states": document["num_states"],
        "num_entries": document["num_entries"],
        "state_type": document["state_type"],
        "action_type": document["action_type"],
        "read_back": "identical",
    }
    for key, value in (metadata or {}).items():
        sidecar.setdefault(key, value)
    update_sidecar(path, sidecar)
    return ExportResult(
        QTABLE_FORMAT, path, sidecar_path(path), sidecar["size_bytes"], sidecar["sha256"], sidecar
    )
