"""`tether export --all QUERY`: which registered model versions a query selects (real SQLite store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.export.runtime import ExportError
from tether.export.selection import ModelQuery, parse_query, select_models
from tether.store import open_store
from tether.store.api import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(f"sqlite:///{tmp_path / 'registry.db'}") as s:
        for name in ("rover", "rover", "rover", "rover-night", "monster"):
            s.models.register(name, tmp_path / f"{name}.pt", algorithm="ppo")
        s.models.register("rover-onnx", tmp_path / "policy.onnx")
        s.models.promote("rover", 2)
        yield s


def _refs(store: Store, text: str) -> list[str]:
    return [r.ref for r in select_models(store, parse_query(text)).models]


def test_query_forms() -> None:
    assert parse_query("rover") == ModelQuery("rover")
    assert parse_query("rover*@3") == ModelQuery("rover*", version=3)
    assert parse_query("*@production") == ModelQuery("*", stage="production")
    assert str(parse_query("r?ver@archived")) == "r?ver@archived"
    for bad in ("", "@production", "rover@nightly", "rover@0", "rover@1@2", "rover@-1"):
        with pytest.raises(ExportError, match="registry query"):
            parse_query(bad)


def test_newest_version_per_name_by_default(store: Store) -> None:
    assert _refs(store, "rover") == ["rover@3"]
    assert _refs(store, "*") == ["monster@1", "rover@3", "rover-night@1"]
    assert _refs(store, "rover*") == ["rover@3", "rover-night@1"]
    assert _refs(store, "[mr]o*r") == ["monster@1", "rover@3"]
    assert _refs(store, "?over") == ["rover@3"]


def test_version_and_stage(store: Store) -> None:
    assert _refs(store, "rover*@1") == ["rover@1", "rover-night@1"]
    assert _refs(store, "*@production") == ["rover@2"]
    # Versions 1 and 3 are in staging: the newest of them per name.
    assert _refs(store, "rover@staging") == ["rover@3"]
    store.models.promote("rover", 3)  # archives version 2
    assert _refs(store, "rover@archived") == ["rover@2"]


def test_non_checkpoints_are_left_out_and_named(store: Store) -> None:
    selection = select_models(store, parse_query("rover*"))
    assert [r.ref for r in selection.skipped] == ["rover-onnx@1"]
    with pytest.raises(ExportError, match=r"no checkpoint.*rover-onnx@1 \(onnx\)"):
        select_models(store, parse_query("rover-onnx"))


def test_empty_selection_is_one_clear_error(store: Store) -> None:
    for text in ("drone*", "rover@9", "monster@production"):
        with pytest.raises(ExportError, match="matches no model"):
            select_models(store, parse_query(text))
