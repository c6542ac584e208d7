"""Export of a tabular Q-learning run as its table: the `tether-qtable` JSON document that
`QTableLearner.to_json()` writes, with the usual sidecar.

A table has no graph to compare with PyTorch; the check is that the file, read back through the
same validating parser a device-side import uses, gives exactly the learner's table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tether.algos.qtable import QTableError, QTableLearner, parse_qtable_json
from tether.checkpoint import atomic_write_text
from tether.export.runtime import ExportError

QTABLE_FORMAT = "qtable-json"


def export_qtable_json(learner: Any, path: Path, metadata: dict[str, Any] | None = None) -> Any:
    """Write `learner`'s table to `path` and its sidecar next to it; returns the `ExportResult`."""
    from tether.export.onnx import add_metadata, file_facts, sidecar_result

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
        **file_facts(path, QTABLE_FORMAT),
        **{k: document[k] for k in ("num_states", "num_entries", "state_type", "action_type")},
        "read_back": "identical",
    }
    add_metadata(sidecar, metadata)
    return sidecar_result(path, sidecar)
