"""Which registered models `tether export --all QUERY` exports.

The query is the vocabulary of `tether models show`, `NAME`, `NAME@VERSION` or `NAME@STAGE`,
where NAME may be a shell-style pattern (`*`, `?`, `[abc]`, matched case-sensitively against
whole names):

- `NAME`: the newest version of every matching name (what `tether models show NAME` shows);
- `NAME@VERSION`: that version of every matching name that has it;
- `NAME@STAGE`: the newest version in that stage (staging, production, archived) of each name.

Only versions whose artifact is a Tether checkpoint (artifact format `torch`) can be exported;
the others (already ONNX, TFLite, ...) are counted and left out.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tether.export.runtime import ExportError
from tether.store.models import MODEL_STAGES
from tether.store.registry import ModelRecord

if TYPE_CHECKING:
    from tether.store.api import Store

__all__ = ["CHECKPOINT_FORMAT", "ModelQuery", "Selection", "parse_query", "select_models"]

CHECKPOINT_FORMAT = "torch"
_GLOB_CHARS = frozenset("*?[")
# Far above any real registry; the registry lists newest version first within each name.
_LIST_LIMIT = 100_000


@dataclass(frozen=True)
class ModelQuery:
    pattern: str
    version: int | None = None
    stage: str | None = None

    def __str__(self) -> str:
        tail = f"@{self.version}" if self.version is not None else f"@{self.stage}" if self.stage else ""
        return self.pattern + tail


@dataclass
class Selection:
    models: list[ModelRecord]  # checkpoints to export, by name then version
    skipped: list[ModelRecord]  # matched, but their artifact is not a checkpoint


def parse_query(text: str) -> ModelQuery:
    """`PATTERN`, `PATTERN@VERSION` or `PATTERN@STAGE`; a malformed query is one ExportError."""
    pattern, sep, tail = text.strip().partition("@")
    if not pattern or "@" in tail or any(ord(ch) < 32 for ch in pattern):
        raise ExportError(
            f"registry query {text!r} is not NAME, NAME@VERSION or NAME@STAGE "
            "(NAME may use * ? [...] patterns, e.g. 'rover*@production')."
        )
    if not sep:
        return ModelQuery(pattern)
    if tail in MODEL_STAGES:
        return ModelQuery(pattern, stage=tail)
    if tail.isdigit() and int(tail) >= 1:
        return ModelQuery(pattern, version=int(tail))
    raise ExportError(
        f"registry query {text!r}: {tail!r} is neither a version number nor a stage "
        f"({', '.join(MODEL_STAGES)})."
    )


def select_models(store: Store, query: ModelQuery) -> Selection:
    """The model versions `query` selects in `store`'s registry, one per matching name.

    Raises ExportError when nothing exportable matches, naming what did match."""
    exact = not (_GLOB_CHARS & set(query.pattern))
    rows = store.models.list(name=query.pattern if exact else None, stage=query.stage, limit=_LIST_LIMIT)
    picked: dict[str, ModelRecord] = {}
    for record in rows:
        if not fnmatch.fnmatchcase(record.name, query.pattern):
            continue
        if query.version is not None and record.version != query.version:
            continue
        # Newest first within a name: the first row kept for a name is its newest match.
        picked.setdefault(record.name, record)
    chosen = sorted(picked.values(), key=lambda r: (r.name, r.version))
    models = [r for r in chosen if r.artifact_format == CHECKPOINT_FORMAT]
    skipped = [r for r in chosen if r.artifact_format != CHECKPOINT_FORMAT]
    if not models:
        if skipped:
            found = ", ".join(f"{r.ref} ({r.artifact_format})" for r in skipped[:5])
            raise ExportError(
                f"registry query '{query}' matches no checkpoint, only already-exported artifacts: "
                f"{found}; register the .pt checkpoint to export it."
            )
        raise ExportError(
            f"registry query '{query}' matches no model in {store.url}; see tether models list."
        )
    return Selection(models, skipped)
