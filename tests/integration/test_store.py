"""The store against real databases: every store test runs on SQLite (a temp file) and on the real
PostgreSQL at 127.0.0.1:5432 (database `test`, trust auth, user postgres or root), each test in a
fresh schema of its own that is dropped afterwards, so parallel runs never collide.

No mocks of the database anywhere. Sections: schema, experience, outcomes, registry, runs,
background writer, export, URLs/errors, crash safety (kill -9), CLI.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner

from tether.algos.base import Transitions
from tether.commands.store import register
from tether.store import Outcome, Store, StoreError, open_store, read_npz, resolve_url
from tether.store.engine import SCHEMA_HEAD, VERSION_TABLE, head_revision
from tether.store.export import export_npz

pytestmark = pytest.mark.integration

PG_HOST, PG_PORT, PG_DB = "127.0.0.1", 5432, "test"
SESSION_PREFIX = f"tether_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
_schema_numbers = itertools.count(1)
_source_numbers = itertools.count(1)


# ---------------------------------------------------------------------------------------------
# backends


def _pg_connect(user: str, **kw: Any) -> Any:
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_DB, user=user, connect_timeout=3, **kw)


@pytest.fixture(scope="session")
def pg_user() -> Iterator[str | None]:
    """The PostgreSQL user that trust auth lets in (postgres, else root), or None if no server."""
    found = None
    for user in ("postgres", "root"):
        try:
            with _pg_connect(user):
                found = user
                break
        except Exception:
            continue
    yield found
    if found is not None:  # sweep schemas left by an interrupted test of this session
        with _pg_connect(found, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (SESSION_PREFIX + "%",)
            ).fetchall()
            for (name,) in rows:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def _pg_url(user: str, schema: str) -> str:
    return f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{PG_DB}?options=-csearch_path%3D{schema}"


def _new_schema(user: str) -> str:
    schema = f"{SESSION_PREFIX}_{next(_schema_numbers)}"
    with _pg_connect(user, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return schema


def _drop_schema(user: str, schema: str) -> None:
    with _pg_connect(user, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="session")
def pg_shared(pg_user: str | None) -> Iterator[str | None]:
    """One migrated schema for this test session (migrating costs ~0.5 s on PostgreSQL, so tests
    share it and start from empty tables instead)."""
    if pg_user is None:
        yield None
        return
    schema = _new_schema(pg_user)
    open_store(_pg_url(pg_user, schema)).close()
    yield _pg_url(pg_user, schema)
    _drop_schema(pg_user, schema)


STORE_TABLES = ("runs", "metrics", "ml_experience_replay", "ml_episode_outcomes", "ml_models")


@pytest.fixture(scope="session")
def sqlite_shared(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'store.db'}"
    open_store(url).close()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, pg_user: str | None) -> Iterator[str]:
    """A migrated, empty store: this session's SQLite file or PostgreSQL schema, tables emptied."""
    if request.param == "sqlite":
        shared = request.getfixturevalue("sqlite_shared")
        with sqlite3.connect(shared.removeprefix("sqlite:///")) as conn:
            for table in reversed(STORE_TABLES):
                conn.execute(f"DELETE FROM {table}")
        yield shared
        return
    pg_shared = request.getfixturevalue("pg_shared")
    if pg_user is None or pg_shared is None:
        pytest.skip(f"PostgreSQL at {PG_HOST}:{PG_PORT} is not reachable")
    schema = pg_shared.rsplit("%3D", 1)[1]
    with _pg_connect(pg_user, autocommit=True) as conn:
        tables = ", ".join(f'"{schema}".{t}' for t in STORE_TABLES)
        conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    yield pg_shared


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path, pg_user: str | None) -> Iterator[str]:
    """A database with no Tether tables at all (a new SQLite file / a new empty schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    if pg_user is None:
        pytest.skip(f"PostgreSQL at {PG_HOST}:{PG_PORT} is not reachable")
    schema = _new_schema(pg_user)
    yield _pg_url(pg_user, schema)
    _drop_schema(pg_user, schema)


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    s = open_store(url)
    yield s
    s.close()


def plain_sql(
    url: str, sql: str, params: dict[str, Any] | None = None, *, commit: bool = False
) -> list[tuple]:
    """Run SQL the way another program would: its own plain engine, none of Tether's code."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            result = conn.execute(text(sql), params or {})
            rows = [tuple(r) for r in result] if result.returns_rows else []
            if commit:
                conn.commit()
            return rows
    finally:
        engine.dispose()


def make_batch(n: int = 16, *, seed: int = 0, obs_dim: int = 28, act_dim: int = 3) -> Transitions:
    """28-D continuous-control transitions (the benchmark's shape by default)."""
    rng = np.random.default_rng(seed)
    return Transitions(
        obs=rng.standard_normal((n, obs_dim), dtype=np.float32),
        action=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        reward=rng.standard_normal(n).astype(np.float32),
        next_obs=rng.standard_normal((n, obs_dim), dtype=np.float32),
        terminated=rng.random(n) < 0.05,
        truncated=rng.random(n) < 0.02,
    )


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    """Bit-identical: same dtype, same shape, same bytes (NaN payloads and -0.0 included)."""
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def assert_batches_equal(a: Transitions, b: Transitions) -> None:
    for name in ("obs", "action", "next_obs", "terminated", "truncated"):
        assert_same(getattr(a, name), getattr(b, name))
    assert_same(np.asarray(a.reward, dtype=np.float32), b.reward)


# ---------------------------------------------------------------------------------------------
# schema


def test_open_creates_schema_once_and_reopens(fresh_url):
    with open_store(fresh_url) as store:
        assert store.stats().schema_revision == SCHEMA_HEAD
    with open_store(fresh_url) as store:  # second open: nothing to migrate, same revision
        stats = store.stats()
        assert stats.schema_revision == SCHEMA_HEAD
        assert stats.experience_table == "plain table"  # no TimescaleDB on the test server
        assert stats.timescaledb is False
        assert set(stats.rows) == {
            "runs",
            "metrics",
            "ml_experience_replay",
            "ml_episode_outcomes",
            "ml_models",
        }
    rows = plain_sql(fresh_url, f"SELECT version_num FROM {VERSION_TABLE}")
    assert rows == [(SCHEMA_HEAD,)]


def test_schema_head_constant_matches_alembic():
    assert head_revision() == SCHEMA_HEAD


def test_concurrent_first_open_migrates_once(fresh_url):
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            open_store(fresh_url).close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert plain_sql(fresh_url, f"SELECT count(*) FROM {VERSION_TABLE}") == [(1,)]


def test_many_openers_of_new_sqlite_files_never_see_a_lock(tmp_path):
    # SQLite refuses a second WAL conversion of a new file at once ("database is locked", no busy
    # wait); rounds of four openers hit it 7 times in 100 before the store retried.
    errors: list[BaseException] = []

    def opener(url: str) -> None:
        try:
            open_store(url).close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    for round_ in range(40):
        url = f"sqlite:///{tmp_path / f'fresh-{round_}.db'}"
        threads = [threading.Thread(target=opener, args=(url,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_newer_schema_is_refused_with_a_clear_message(fresh_url):
    open_store(fresh_url).close()
    plain_sql(fresh_url, f"UPDATE {VERSION_TABLE} SET version_num = '9999_future'", commit=True)
    with pytest.raises(StoreError, match="newer Tether schema"):
        open_store(fresh_url)


def test_foreign_table_with_our_name_is_reported(fresh_url):
    plain_sql(fresh_url, "CREATE TABLE ml_models (id INTEGER PRIMARY KEY, game_column TEXT)", commit=True)
    with pytest.raises(StoreError, match="already has a table") as info:
        open_store(fresh_url)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# experience round trip


def test_round_trip_28d_float32_bit_identical(store):
    batch = make_batch(256, seed=1)
    # Values that text formats mangle: NaN with a payload, -0.0, subnormals, infinities.
    batch.obs[0, :4] = np.array([np.nan, -0.0, 1e-45, np.inf], dtype=np.float32)
    batch.obs[1, 0] = np.frombuffer(np.uint32(0x7FC00123).tobytes(), dtype=np.float32)[0]
    assert store.experience.write("rover-1", batch, episode=7, step=np.arange(100, 356)) == 256
    back = store.experience.load_transitions("rover-1")
    assert_batches_equal(batch, back)
    chunk = next(store.experience.iter_chunks("rover-1"))
    assert chunk.sources == ["rover-1"] * 256
    assert chunk.episodes.tolist() == [7] * 256
    assert chunk.steps.tolist() == list(range(100, 356))


@pytest.mark.parametrize(
    ("obs_shape", "obs_dtype", "action_shape", "action_dtype"),
    [
        ((3, 8, 8), np.uint8, (), np.int64),  # image observations, discrete actions
        ((5,), np.float64, (2,), np.float32),
        ((), np.float32, (), np.bool_),  # scalar observation
        ((2, 3), np.int16, (4,), np.int32),
    ],
)
def test_round_trip_other_shapes_and_dtypes(store, obs_shape, obs_dtype, action_shape, action_dtype):
    rng = np.random.default_rng(3)
    n = 17

    def arr(shape, dtype):
        raw = rng.integers(0, 256, size=(n, *shape, np.dtype(dtype).itemsize), dtype=np.uint8)
        out = raw.view(dtype).reshape(n, *shape)
        return out.astype(bool) if dtype is np.bool_ else out

    batch = Transitions(
        obs=arr(obs_shape, obs_dtype),
        action=arr(action_shape, action_dtype),
        reward=rng.standard_normal(n).astype(np.float32),
        next_obs=arr(obs_shape, obs_dtype),
        terminated=rng.random(n) < 0.5,
        truncated=rng.random(n) < 0.5,
    )
    store.experience.write("src", batch)
    assert_batches_equal(batch, store.experience.load_transitions("src"))


_DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.uint8, np.int8, np.int32, np.int64])
_SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 12),
    obs_shape=_SHAPES,
    obs_dtype=_DTYPES,
    action_shape=_SHAPES,
    action_dtype=_DTYPES,
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(store, n, obs_shape, obs_dtype, action_shape, action_dtype, seed):
    rng = np.random.default_rng(seed)

    def arr(shape, dtype):
        size = n * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return np.frombuffer(rng.bytes(size), dtype=dtype).reshape(n, *shape).copy()

    batch = Transitions(
        obs=arr(obs_shape, obs_dtype),
        action=arr(action_shape, action_dtype),
        reward=rng.standard_normal(n).astype(np.float32),
        next_obs=arr(obs_shape, obs_dtype),
        terminated=rng.random(n) < 0.5,
        truncated=rng.random(n) < 0.5,
    )
    source = f"prop-{next(_source_numbers)}"
    assert store.experience.write(source, batch, episode=seed % 1000, step=np.arange(n)) == n
    back = store.experience.load_transitions(source)
    assert len(back) == n
    if n:
        assert_batches_equal(batch, back)


def test_big_endian_input_is_stored_little_endian(store, url):
    batch = make_batch(4, seed=2)
    big = Transitions(
        obs=batch.obs.astype(">f4"), action=batch.action, reward=batch.reward,
        next_obs=batch.next_obs.astype(">f4"), terminated=batch.terminated, truncated=batch.truncated,
    )  # fmt: skip
    store.experience.write("be", big)
    back = store.experience.load_transitions("be")
    assert back.obs.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(back.obs, batch.obs)
    assert plain_sql(url, "SELECT DISTINCT obs_dtype FROM ml_experience_replay") == [("<f4",)]


def test_other_programs_read_rows_with_plain_sql(store, url):
    """The recipe in docs/store.md: little-endian bytes + JSON shape + numpy dtype string."""
    batch = make_batch(3, seed=5)
    store.experience.write("game-server", batch, episode=4, step=np.arange(3), extra={"archetype": "tank"})
    rows = plain_sql(
        url,
        "SELECT source, episode, step, obs, obs_shape, obs_dtype, action, action_shape, action_dtype, "
        "reward, terminated, truncated, extra FROM ml_experience_replay ORDER BY id",
    )
    assert len(rows) == 3
    for i, (
        src,
        ep,
        step,
        obs,
        obs_shape,
        obs_dtype,
        act,
        act_shape,
        act_dtype,
        rew,
        term,
        trunc,
        extra,
    ) in enumerate(rows):
        assert (src, ep, step) == ("game-server", 4, i)
        decoded = np.frombuffer(bytes(obs), dtype=obs_dtype).reshape(json.loads(obs_shape))
        assert_same(decoded, batch.obs[i])
        assert_same(
            np.frombuffer(bytes(act), dtype=act_dtype).reshape(json.loads(act_shape)), batch.action[i]
        )
        assert np.float32(rew) == batch.reward[i]
        assert bool(term) == bool(batch.terminated[i]) and bool(trunc) == bool(batch.truncated[i])
        assert (json.loads(extra) if isinstance(extra, str) else extra) == {"archetype": "tank"}


def test_extras_round_trip(store):
    batch = make_batch(50, seed=6)
    batch.extras = {
        "logp": np.random.default_rng(0).standard_normal(50).astype(np.float32),
        "env_index": np.arange(50),
    }
    store.experience.write("ppo", batch, extra={"archetype": "mage"}, include_extras=True)
    back = store.experience.load_transitions("ppo", with_extras=True)
    assert_same(batch.extras["logp"], back.extras["logp"])
    assert back.extras["env_index"].tolist() == list(range(50))
    assert "archetype" not in back.extras  # text extras stay in the raw JSON
    chunk = next(store.experience.iter_chunks("ppo", with_extras=True))
    assert chunk.extras[0]["archetype"] == "mage"
    assert store.experience.load_transitions("ppo").extras == {}


def test_iterate_in_chunks_and_load_newest(store):
    parts = [make_batch(n, seed=s) for s, n in enumerate((30, 25, 40))]
    for i, part in enumerate(parts):
        store.experience.write("a", part, episode=i)
    store.experience.write("b", make_batch(5, seed=9))
    chunks = list(store.experience.iter_transitions("a", chunk_rows=7))
    assert [len(c) for c in chunks] == [7] * 13 + [4]
    whole = np.concatenate([c.obs for c in chunks])
    assert_same(whole, np.concatenate([p.obs for p in parts]))
    newest = store.experience.load_transitions("a", newest=40)
    assert_same(newest.obs, parts[2].obs)
    assert len(store.experience.load_transitions("a", newest=10_000)) == 95
    assert store.experience.count() == 100
    assert {s.source: s.rows for s in store.experience.sources()} == {"a": 95, "b": 5}


def _episode(seed: int, n: int) -> Transitions:
    b = make_batch(n, seed=seed)
    b.terminated[:] = False
    b.truncated[:] = False
    b.terminated[-1] = True
    return b


def _slice(b: Transitions, lo: int, hi: int) -> Transitions:
    return Transitions(b.obs[lo:hi], b.action[lo:hi], b.reward[lo:hi], b.next_obs[lo:hi],
                       b.terminated[lo:hi], b.truncated[lo:hi])  # fmt: skip


def _buffer_rows(buf: Any) -> dict[str, np.ndarray]:
    n = len(buf)
    order = np.argsort(buf.obs[:n, 0], kind="stable")
    return {
        k: getattr(buf, k)[:n][order]
        for k in ("obs", "action", "reward", "next_obs", "terminated", "discount")
    }


@pytest.mark.parametrize("n_step", [1, 3])
def test_load_into_replay_buffer_keeps_episodes_apart(store, n_step):
    from tether.buffers.replay import ReplayBuffer

    a, b = _episode(1, 10), _episode(2, 6)
    # Interleaved as two devices would send them: A[0:5], B[0:6], A[5:10].
    parts = [("dev", 1, _slice(a, 0, 5), 0), ("dev", 2, b, 0), ("dev", 1, _slice(a, 5, 10), 5)]
    for source, ep, part, s0 in parts:
        store.experience.write(source, part, episode=ep, step=np.arange(s0, s0 + len(part)))

    def new_buffer() -> Any:
        return ReplayBuffer(100, (28,), (3,), action_dtype=np.float32, n_step=n_step, gamma=0.9)

    loaded = new_buffer()
    assert store.experience.load_into(loaded, "dev", chunk_rows=4) == 16
    reference = new_buffer()
    for stream, part in ((0, _slice(a, 0, 5)), (1, b), (0, _slice(a, 5, 10))):
        part.extras = {"stream": np.full(len(part), stream)}
        reference.add(part)
    assert len(loaded) == len(reference) > 0
    for key, want in _buffer_rows(reference).items():
        assert_same(_buffer_rows(loaded)[key], want)

    newest = new_buffer()
    assert store.experience.load_into(newest, "dev", newest=5) == 5
    if n_step == 1:
        assert_same(newest.obs[: len(newest)], a.obs[5:10])


def test_iteration_end_is_fixed_when_it_starts(store):
    store.experience.write("a", make_batch(10, seed=1))
    it = store.experience.iter_transitions("a", chunk_rows=4)
    first = next(it)
    store.experience.write("a", make_batch(10, seed=2))  # arrives during iteration
    rest = list(it)
    assert len(first) + sum(len(c) for c in rest) == 10


def test_empty_source_loads_empty(store):
    assert len(store.experience.load_transitions("nothing")) == 0
    assert list(store.experience.iter_transitions("nothing")) == []
    assert store.experience.write("empty", make_batch(0)) == 0
    assert store.experience.count() == 0


def test_mixed_shapes_need_a_source(store):
    store.experience.write("small", make_batch(5, obs_dim=4))
    store.experience.write("big", make_batch(5, obs_dim=28))
    with pytest.raises(StoreError, match="--source"):
        store.experience.load_transitions()
    assert store.experience.load_transitions("small").obs.shape == (5, 4)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("obs", b"\x00" * 5, "5-byte obs"),
        ("obs_shape", "not json", "obs_shape='not json'"),
        ("obs_shape", "[-1]", "non-negative integers"),
        ("obs_shape", '{"a": 1}', "non-negative integers"),
        ("obs_dtype", "O", "numeric numpy"),
        ("obs_dtype", "<U4", "numeric numpy"),
        ("obs_dtype", "bogus!", "numeric numpy"),
        ("action_dtype", "V16", "numeric numpy"),
    ],
)
def test_hostile_rows_written_by_other_programs_fail_clearly(store, url, column, value, message):
    store.experience.write("x", make_batch(3, seed=1))
    plain_sql(
        url,
        f"UPDATE ml_experience_replay SET {column} = :v "
        "WHERE id = (SELECT min(id) FROM ml_experience_replay)",
        {"v": value},
        commit=True,
    )
    with pytest.raises(StoreError, match="fix or delete that row") as info:
        store.experience.load_transitions("x")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: setattr(b, "reward", b.reward[:-1]), "rows but reward has"),
        (lambda b: b.reward.__setitem__(0, np.nan), "NaN or infinity"),
        (lambda b: setattr(b, "next_obs", b.next_obs[:, :3]), "must have the same shape"),
        (lambda b: setattr(b, "action", b.action.astype(object)), "bool, integer and float"),
        (
            lambda b: setattr(b, "obs", b.obs.astype(complex)) or setattr(b, "next_obs", b.obs),
            "bool, integer and float",
        ),
        (lambda b: setattr(b, "terminated", b.terminated[:2]), "terminated must have shape"),
        (lambda b: setattr(b, "reward", b.reward.reshape(2, 2)), "must be 1-D"),
        (lambda b: setattr(b, "extras", {"v": np.zeros(3)}), "one entry per row"),
        (lambda b: setattr(b, "extras", {"v": np.full(4, np.nan)}), "not plain JSON"),
    ],
)
def test_bad_batches_are_rejected_and_nothing_is_written(store, mutate, message):
    batch = make_batch(4, seed=1)
    mutate(batch)
    with pytest.raises(StoreError, match=message):
        store.experience.write("x", batch, include_extras=True)
    assert store.experience.count() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": ""}, "non-empty"),
        ({"source": "a\x00b"}, "control characters"),
        ({"source": "x" * 201}, "at most 200"),
        ({"episode": [1, 2]}, "one per row"),
        ({"step": np.array([0.5, 1, 2, 3])}, "must be integers"),
        ({"extra": {"s": {1, 2}}}, "not plain JSON"),
        ({"extra": {"x": float("nan")}}, "not plain JSON"),
        ({"extra": ["not", "a", "dict"]}, "dict of JSON"),
    ],
)
def test_bad_write_arguments_are_rejected(store, kwargs, message):
    args = {"source": "ok", **kwargs}
    source = args.pop("source")
    with pytest.raises(StoreError, match=message):
        store.experience.write(source, make_batch(4), **args)
    assert store.experience.count() == 0


def test_sql_quotes_in_source_are_data_not_sql(store):
    evil = "x'); DROP TABLE runs; --"
    store.experience.write(evil, make_batch(3))
    assert store.experience.load_transitions(evil).obs.shape == (3, 28)
    assert store.runs.list() == []  # the table is still there


# ---------------------------------------------------------------------------------------------
# outcomes


def test_episode_outcomes(store):
    run_id = store.runs.start("monster", algorithm="dqn")
    store.outcomes.write(1, 10.5, 100, success=True, run_id=run_id, archetype="tank", tags=["pvp"])
    store.outcomes.write_many(
        [
            Outcome(episode=e, episode_return=float(e), length=50, run_id=run_id, source="srv")
            for e in range(2, 6)
        ]
    )
    assert store.outcomes.count(run_id) == 5
    newest = store.outcomes.list(run_id=run_id, limit=2)
    assert [o.episode for o in newest] == [5, 4]
    tank = store.outcomes.list(archetype="tank")
    assert len(tank) == 1 and tank[0].tags == ["pvp"] and tank[0].success is True
    assert tank[0].created_at is not None and tank[0].created_at.tzinfo is not None
    with pytest.raises(StoreError, match="non-finite return"):
        store.outcomes.write(9, float("inf"), 10)
    with pytest.raises(StoreError, match="list of strings"):
        store.outcomes.write(9, 1.0, 10, tags="pvp")  # type: ignore[arg-type]
    assert store.outcomes.count() == 5


# ---------------------------------------------------------------------------------------------
# model registry


def test_model_register_promote_and_find_by_stage(store, url, tmp_path):
    run_id = store.runs.start("monster")
    v1 = store.models.register("tank_combat", tmp_path / "v1.onnx", algorithm="dqn", archetype="tank",
                               metrics={"win_rate": 0.61}, parent_run_id=run_id)  # fmt: skip
    v2 = store.models.register("tank_combat", "s3://bucket/v2.onnx", tags=["fp16"])
    assert (v1.version, v1.stage, v2.version) == (1, "staging", 2)
    assert v1.artifact_uri == str((tmp_path / "v1.onnx").resolve())
    assert v2.artifact_uri == "s3://bucket/v2.onnx" and v2.artifact_format == "onnx"
    assert store.models.get("tank_combat", stage="production") is None

    store.models.promote("tank_combat", 1)
    found = store.models.get("tank_combat", stage="production")
    assert found is not None and found.version == 1 and found.metrics == {"win_rate": 0.61}
    assert found.parent_run_id == run_id and found.archetype == "tank"

    store.models.promote("tank_combat", 2)
    assert store.models.production("tank_combat").version == 2
    assert store.models.get("tank_combat", 1).stage == "archived"
    # Plain-SQL readers (the game server) see exactly one production row.
    rows = plain_sql(url, "SELECT version FROM ml_models WHERE name = 'tank_combat' AND stage = 'production'")
    assert rows == [(2,)]

    store.models.promote("tank_combat", 2)  # idempotent
    assert [m.stage for m in store.models.list(name="tank_combat")] == ["production", "archived"]
    store.models.archive("tank_combat", 2)
    assert store.models.production("tank_combat") is None
    assert store.models.get("tank_combat").version == 2  # newest regardless of stage


def test_model_registry_errors(store):
    store.models.register("m", "a.onnx", version=3)
    with pytest.raises(StoreError, match=r"m@3 already exists"):
        store.models.register("m", "b.onnx", version=3)
    assert store.models.register("m", "c.tflite").version == 4
    with pytest.raises(StoreError, match=r"No model m@9"):
        store.models.promote("m", 9)
    with pytest.raises(StoreError, match="No run 'ghost'"):
        store.models.register("m", "d.onnx", parent_run_id="ghost")
    with pytest.raises(StoreError, match="Cannot tell the format"):
        store.models.register("m", "weights.bin")
    with pytest.raises(StoreError, match="separates NAME@VERSION"):
        store.models.register("m@2", "a.onnx")
    with pytest.raises(StoreError, match="positive integer"):
        store.models.promote("m", 0)
    with pytest.raises(StoreError, match="stage must be one of"):
        store.models.get("m", stage="live")
    assert store.models.register("m", "weights.bin", artifact_format="rknn").artifact_format == "rknn"


def test_database_itself_forbids_two_production_versions(store, url):
    store.models.register("m", "a.onnx")
    store.models.register("m", "b.onnx")
    store.models.promote("m", 1)
    with pytest.raises(IntegrityError), store.write_tx() as conn:
        conn.execute(text("UPDATE ml_models SET stage = 'production' WHERE name = 'm' AND version = 2"))
    with pytest.raises(IntegrityError), store.write_tx() as conn:
        conn.execute(text("UPDATE ml_models SET stage = 'live' WHERE name = 'm'"))


def test_concurrent_promotions_leave_one_production(store):
    for _ in range(6):
        store.models.register("race", "a.onnx")
    errors: list[BaseException] = []

    def promote(version: int) -> None:
        try:
            for _ in range(3):
                store.models.promote("race", version)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stages = [m.stage for m in store.models.list(name="race")]
    assert stages.count("production") == 1 and stages.count("archived") == 5


def test_concurrent_registrations_get_distinct_versions(store):
    versions: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def register() -> None:
        try:
            for _ in range(3):
                v = store.models.register("busy", "a.onnx").version
                with lock:
                    versions.append(v)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(versions) == list(range(1, 13))


# ---------------------------------------------------------------------------------------------
# runs and metrics


def test_runs_and_metrics_history(store):
    run_id = store.runs.start("luna", preset="lunabotics", algorithm="ppo", env_id="tether/Lunabotics-v0",
                              config={"training": {"lr": 3e-4}}, run_dir="runs/luna")  # fmt: skip
    for step in range(1, 6):
        store.runs.log_metrics(
            run_id, step * 100, {"loss": 1.0 / step, "sps": np.float32(5000 + step), "phase": "train"}
        )
    store.runs.log_metrics(run_id, 600, {"loss": float("nan"), "kl": float("inf")})
    run = store.runs.get(run_id)
    assert run.status == "running" and run.finished_at is None and run.config == {"training": {"lr": 3e-4}}
    loss = store.runs.metrics(run_id, "loss")
    assert [p.step for p in loss] == [100, 200, 300, 400, 500, 600]
    assert loss[0].value == 1.0 and np.isnan(loss[-1].value)
    assert [p.step for p in store.runs.metrics(run_id, "loss", limit=2)] == [500, 600]
    latest = store.runs.latest_metrics(run_id)
    assert set(latest) == {"loss", "sps", "kl"}  # the string "phase" is not a metric
    assert latest["sps"].step == 500 and latest["sps"].value == 5005.0
    assert latest["kl"].value == float("inf")
    assert store.runs.count_metrics(run_id) == 12

    store.runs.finish(run_id, "completed", {"return_mean": 310.5, "diverged": float("nan")})
    run = store.runs.get(run_id)
    assert run.status == "completed" and run.finished_at >= run.started_at
    assert run.summary == {"return_mean": 310.5, "diverged": None}

    again = store.runs.start("luna", run_id=run_id, run_dir="runs/luna2")  # resume
    assert again == run_id
    run = store.runs.get(run_id)
    assert run.status == "running" and run.finished_at is None and run.run_dir == "runs/luna2"
    assert run.config == {"training": {"lr": 3e-4}}  # kept

    other = store.runs.start("rover")
    store.runs.finish(other, "failed")
    assert [r.id for r in store.runs.list()][:2] == [other, run_id]
    assert [r.id for r in store.runs.list(status="failed")] == [other]
    assert [r.id for r in store.runs.list(name="luna")] == [run_id]


def test_run_errors(store):
    with pytest.raises(StoreError, match="No run 'ghost'"):
        store.runs.log_metrics("ghost", 1, {"loss": 1.0})
    with pytest.raises(StoreError, match="No run 'ghost'"):
        store.runs.finish("ghost")
    run_id = store.runs.start("x")
    with pytest.raises(StoreError, match="completed, failed, stopped"):
        store.runs.finish(run_id, "exploded")
    with pytest.raises(StoreError, match="step must be an integer"):
        store.runs.log_metrics(run_id, 1.5, {"loss": 1.0})  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="not plain JSON"):
        store.runs.start("y", config={"f": object()})
    assert store.runs.count_metrics(run_id) == 0


# ---------------------------------------------------------------------------------------------
# background writer


def test_writer_commits_everything_and_reports_ids(store):
    committed: list[int] = []
    run_id = store.runs.start("w")
    with store.writer(on_commit=committed.extend, max_batch_rows=300) as w:
        ids = []
        for k in range(20):
            ids.append(w.write_transitions("w", make_batch(64, seed=k), episode=k, step=np.arange(64)))
            ids.append(w.log_metrics(run_id, k, {"loss": float(k)}))
        ids.append(w.write_outcomes([Outcome(episode=1, episode_return=2.0, length=3, run_id=run_id)]))
        assert w.flush(timeout=30)
        stats = w.stats()
    assert sorted(committed) == ids == list(range(1, 42))
    assert stats.committed_batches == 41 and stats.dropped_batches == 0 and stats.failed_batches == 0
    assert stats.committed_rows == 20 * 64 + 20 + 1
    assert stats.transactions < 41  # batches were grouped
    assert store.experience.count("w") == 1280
    assert len(store.runs.metrics(run_id, "loss")) == 20
    assert store.outcomes.count(run_id) == 1
    back = store.experience.load_transitions("w")
    assert_same(back.obs[:64], make_batch(64, seed=0).obs)


def test_writer_copies_the_callers_buffers(store):
    gate = threading.Event()
    w = store.writer(before_commit=lambda ids: gate.wait(30))
    batch = make_batch(8, seed=4)
    original = batch.obs.copy()
    w.write_transitions("buf", batch)
    batch.obs[:] = 0  # the trainer reuses its rollout buffer right away
    gate.set()
    assert w.close(timeout=30)
    assert_same(store.experience.load_transitions("buf").obs, original)


def test_writer_drops_when_full_and_counts(store):
    gate = threading.Event()
    committed: list[int] = []
    w = store.writer(on_commit=committed.extend, before_commit=lambda ids: gate.wait(30),
                     max_queue_rows=100, max_batch_rows=50, block_s=0.01, linger_s=0.0)  # fmt: skip
    results = [w.write_transitions("full", make_batch(50, seed=k), episode=k) for k in range(8)]
    dropped = [k for k, r in enumerate(results) if r is None]
    assert dropped, "a stalled database must make the writer drop, not block"
    stats = w.stats()
    assert stats.dropped_batches == len(dropped) and stats.dropped_rows == 50 * len(dropped)
    gate.set()
    assert w.close(timeout=30)
    kept = [k for k, r in enumerate(results) if r is not None]
    assert sorted(committed) == [r for r in results if r is not None]
    chunk_episodes = set()
    for chunk in store.experience.iter_chunks("full"):
        chunk_episodes |= set(chunk.episodes.tolist())
    assert chunk_episodes == set(kept)
    assert store.experience.count("full") == 50 * len(kept)


def test_writer_isolates_a_batch_that_cannot_be_written(store):
    committed: list[int] = []
    failed: list[int] = []
    gate = threading.Event()
    w = store.writer(on_commit=committed.extend, on_error=lambda ids, exc: failed.extend(ids),
                     before_commit=lambda ids: gate.wait(30))  # fmt: skip
    w._retry_delay_s = 0.0
    first = w.write_transitions("ok", make_batch(5))  # group 1 (held at the gate)
    good = w.write_transitions("ok", make_batch(5, seed=2))
    bad = w.log_metrics("no-such-run", 1, {"loss": 1.0})  # violates the runs foreign key
    later = w.write_transitions("ok", make_batch(5, seed=3))
    gate.set()
    assert w.close(timeout=30)
    assert failed == [bad]
    assert sorted(committed) == sorted([first, good, later])
    stats = w.stats()
    assert stats.failed_batches == 1 and "no-such-run" in (stats.last_error or "")
    assert store.experience.count("ok") == 15


def test_writer_rejects_bad_input_in_the_callers_thread(store):
    with store.writer() as w:
        batch = make_batch(4)
        batch.reward[1] = np.nan
        with pytest.raises(StoreError, match="NaN"):
            w.write_transitions("x", batch)
    with pytest.raises(StoreError, match="writer is closed"):
        w.write_transitions("x", make_batch(4))


# ---------------------------------------------------------------------------------------------
# stats and export


def test_stats_counts_rows(store):
    store.experience.write("a", make_batch(12))
    store.runs.start("r")
    stats = store.stats()
    assert stats.rows["ml_experience_replay"] == 12 and stats.rows["runs"] == 1
    assert stats.size_bytes and stats.size_bytes > 0
    assert "@" not in stats.url or "***" in stats.url or ":" not in stats.url.split("@")[0].split("//")[1]


def test_export_npz_round_trip(store, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("export")
    a = make_batch(30, seed=1)
    b = make_batch(20, seed=2)
    store.experience.write("a", a, episode=1, step=np.arange(30))
    store.experience.write("b", b, episode=2, step=np.arange(20))
    summary = export_npz(store, tmp_path / "all.npz", chunk_rows=7)
    assert summary.rows == 50 and summary.sources == ["a", "b"] and summary.obs_shape == (28,)
    batch, arrays = read_npz(tmp_path / "all.npz")
    assert_same(batch.obs, np.concatenate([a.obs, b.obs]))
    assert_same(batch.action, np.concatenate([a.action, b.action]))
    assert_same(batch.reward, np.concatenate([a.reward, b.reward]))
    assert arrays["source_names"].tolist() == ["a", "b"]
    assert arrays["source_index"].tolist() == [0] * 30 + [1] * 20
    assert arrays["step"].tolist() == list(range(30)) + list(range(20))
    assert arrays["created_at"].dtype == np.dtype("datetime64[us]")
    with np.load(tmp_path / "all.npz", allow_pickle=False) as raw:  # plain numpy, no pickle
        assert raw["obs"].shape == (50, 28)

    only_b = export_npz(store, tmp_path / "b", source="b", compress=True)
    assert only_b.path == tmp_path / "b.npz" and only_b.rows == 20
    assert_same(read_npz(only_b.path)[0].next_obs, b.next_obs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.npz", "b.npz"]  # no temp files left


def test_export_errors(store, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("export")
    with pytest.raises(StoreError, match="no experience"):
        export_npz(store, tmp_path / "x.npz")
    store.experience.write("small", make_batch(3, obs_dim=4))
    store.experience.write("big", make_batch(3, obs_dim=8))
    with pytest.raises(StoreError, match="--source"):
        export_npz(store, tmp_path / "x.npz", chunk_rows=2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StoreError, match="does not exist"):
        export_npz(store, tmp_path / "missing" / "x.npz", source="small")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(StoreError, match=r"not a readable \.npz"):
        read_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", obs=np.zeros(3))
    with pytest.raises(StoreError, match="not a Tether experience export"):
        read_npz(tmp_path / "other.npz")


# ---------------------------------------------------------------------------------------------
# URLs and connection errors (each message is one sentence that names the fix)


def one_sentence(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg.endswith("."), msg
    assert "Traceback" not in msg
    return msg


@pytest.mark.parametrize(
    ("bad_url", "fix"),
    [
        ("not a url at all", "sqlite:///path/to/file.db"),
        ("://nothing", "sqlite:///path/to/file.db"),
        ("mysql://user@127.0.0.1/db", "SQLite or PostgreSQL"),
        ("oracle+cx_oracle://u@h/db", "SQLite or PostgreSQL"),
        ("postgresql+asyncpg://postgres@127.0.0.1/test", "pip install 'tether[pg]'"),
        ("postgresql+psycopg2://postgres@127.0.0.1/test", "postgresql+psycopg://"),
        ("sqlite+aiosqlite:///x.db", "sqlite:///path/to/file.db"),
        ("postgresql+psycopg://postgres@127.0.0.1:5432", "names no database"),
        ("sqlite://", "give a file path"),
        ("sqlite:///:memory:", "give a file path"),
    ],
)
def test_bad_urls_fail_with_one_sentence(bad_url, fix):
    with pytest.raises(StoreError) as info:
        open_store(bad_url)
    assert fix in one_sentence(info.value)


def test_password_is_not_echoed_in_errors():
    with pytest.raises(StoreError) as info:
        open_store("mysql://user:hunter2@127.0.0.1/db")
    assert "hunter2" not in str(info.value)
    with pytest.raises(StoreError) as info:
        open_store("postgresql+psycopg://user:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(info.value)


def test_unreachable_server_names_host_and_port():
    with pytest.raises(StoreError) as info:
        open_store("postgresql+psycopg://postgres@127.0.0.1:1/test")
    msg = one_sentence(info.value)
    assert "127.0.0.1:1" in msg and "start PostgreSQL" in msg


def test_missing_psycopg_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the [pg] extra were not installed
    with pytest.raises(StoreError) as info:
        open_store("postgresql://postgres@127.0.0.1/test")
    assert "pip install 'tether[pg]'" in one_sentence(info.value)


def test_wrong_database_and_user(pg_user):
    if pg_user is None:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is not reachable")
    with pytest.raises(StoreError) as info:
        open_store(f"postgresql+psycopg://{pg_user}@127.0.0.1:5432/no_such_db_tether")
    msg = one_sentence(info.value)
    assert "no database 'no_such_db_tether'" in msg and "createdb" in msg
    with pytest.raises(StoreError) as info:
        open_store("postgresql+psycopg://no_such_role_tether@127.0.0.1:5432/test")
    assert "no_such_role_tether" in one_sentence(info.value)
    with pytest.raises(StoreError) as info:
        open_store(
            f"postgresql+psycopg://{pg_user}@127.0.0.1:5432/test?options=-csearch_path%3Dno_schema_here"
        )
    assert "CREATE SCHEMA" in one_sentence(info.value)


def test_sqlite_path_problems(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite database" * 200)
    with pytest.raises(StoreError) as info:
        open_store(f"sqlite:///{garbage}")
    assert "not a usable SQLite database" in one_sentence(info.value)
    with pytest.raises(StoreError) as info:
        open_store(f"sqlite:///{tmp_path}")  # a directory
    assert "Cannot open the SQLite database" in one_sentence(info.value)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError) as info:
        open_store(f"sqlite:///{blocker}/sub/tether.db")
    assert "Cannot create the directory" in one_sentence(info.value)


def test_url_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("TETHER_DB", raising=False)
    monkeypatch.delenv("ML_DATA_DIR", raising=False)
    assert resolve_url() == "sqlite:///data/tether.db"
    monkeypatch.setenv("ML_DATA_DIR", str(tmp_path / "d"))
    assert resolve_url() == f"sqlite:///{tmp_path}/d/tether.db"
    with open_store() as store:  # creates the data directory and the file
        store.runs.start("env-default")
    assert (tmp_path / "d" / "tether.db").exists()
    monkeypatch.setenv("TETHER_DB", f"sqlite:///{tmp_path}/env.db")
    assert resolve_url() == f"sqlite:///{tmp_path}/env.db"
    assert resolve_url("sqlite:///explicit.db") == "sqlite:///explicit.db"
    with open_store() as store:
        assert store.runs.list() == []


@pytest.mark.parametrize("url", ["postgresql"], indirect=True)  # SQLite has no server to drop us
def test_store_reconnects_after_the_server_drops_it(store, url, pg_user):
    store.runs.start("before")
    with store.read() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    with _pg_connect(pg_user, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert [r.name for r in store.runs.list()] == ["before"]  # a fresh pooled connection
    store.experience.write("after", make_batch(3))
    assert store.experience.count("after") == 3


def test_sqlite_is_in_wal_mode_with_big_pages(tmp_path):
    path = tmp_path / "wal.db"
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 65536


# ---------------------------------------------------------------------------------------------
# crash safety: kill -9 a writer process mid-stream


CRASH_ROWS = 512  # rows per submitted batch
CRASH_CHILD = r"""
import os, sys, time
from types import SimpleNamespace as Transitions  # the writer only reads the attributes

import numpy as np
from tether.store import open_store

url, ids_path, mode, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = open_store(url)
fd = os.open(ids_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

def report(line):
    os.write(fd, line.encode())
    os.fsync(fd)

def on_commit(ids):  # only after COMMIT returned: these batches are durable
    report("".join(f"{i}\n" for i in ids))

groups = [0]
def before_commit(ids):  # inside the transaction, rows inserted, COMMIT not yet sent
    groups[0] += 1
    if mode == "inflight" and groups[0] == 3:
        report("inflight " + " ".join(map(str, ids)) + "\n")
        time.sleep(120)

w = store.writer(on_commit=on_commit, before_commit=before_commit, max_batch_rows=8 * rows,
                 linger_s=0.0, block_s=30.0)
for k in range(1, 1_000_000):
    rng = np.random.default_rng(k)
    batch = Transitions(
        obs=rng.standard_normal((rows, 28), dtype=np.float32),
        action=rng.standard_normal((rows, 3), dtype=np.float32),
        reward=rng.standard_normal(rows).astype(np.float32),
        next_obs=rng.standard_normal((rows, 28), dtype=np.float32),
        terminated=np.zeros(rows, bool), truncated=np.zeros(rows, bool), extras={},
    )
    if w.write_transitions("crash", batch, episode=k, step=np.arange(rows)) != k:
        sys.exit(3)  # ids must equal episodes for the parent's check
"""


def _read_reports(path: Path) -> tuple[list[int], list[int]]:
    committed: list[int] = []
    inflight: list[int] = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("inflight "):
                inflight = [int(x) for x in line.split()[1:]]
            elif line.strip().isdigit():
                committed.append(int(line))
    return committed, inflight


@pytest.mark.parametrize("mode", ["inflight", "random"])
def test_kill9_writer_keeps_every_reported_batch_and_no_partial_one(url, tmp_path, mode):
    open_store(url).close()  # schema in place before the child starts streaming
    reports = tmp_path / "committed.txt"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, url, str(reports), mode, str(CRASH_ROWS)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            committed, inflight = _read_reports(reports)
            if (mode == "inflight" and inflight) or (mode == "random" and len(committed) >= 12):
                break
            if proc.poll() is not None:
                pytest.fail(
                    f"writer process exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}"
                )
            assert time.monotonic() < deadline, "writer process made no progress"
            time.sleep(0.02)
        if mode == "random":
            time.sleep(random.uniform(0.0, 0.05))  # land anywhere in the stream
        assert proc.poll() is None, "the writer must still be running when it is killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    committed, inflight = _read_reports(reports)
    assert committed, "the writer reported nothing before it was killed"
    with open_store(url) as store:  # reopening runs recovery (WAL replay / server-side abort)
        with store.read() as conn:
            counts = dict(
                conn.execute(
                    text(
                        "SELECT episode, count(*) FROM ml_experience_replay "
                        "WHERE source = 'crash' GROUP BY episode"
                    )
                ).all()
            )
        assert set(counts.values()) == {CRASH_ROWS}, "a batch is in the database only in part"
        missing = set(committed) - set(counts)
        assert not missing, f"batches reported committed are missing: {sorted(missing)[:10]}"
        if mode == "inflight":
            assert inflight and not set(inflight) & set(counts), "an uncommitted transaction survived"
            assert max(committed) < min(inflight)
        # Content of a committed batch is intact, bit for bit.
        k = committed[-1]
        with store.read() as conn:
            blobs = conn.execute(
                text(
                    "SELECT obs FROM ml_experience_replay "
                    "WHERE source = 'crash' AND episode = :k ORDER BY step"
                ),
                {"k": k},
            ).scalars()
            got = np.frombuffer(b"".join(bytes(b) for b in blobs), dtype="<f4").reshape(CRASH_ROWS, 28)
        assert_same(got, np.random.default_rng(k).standard_normal((CRASH_ROWS, 28), dtype=np.float32))
        # And the database takes new writes.
        store.experience.write("after-crash", make_batch(4))
        assert store.experience.count("after-crash") == 4
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---------------------------------------------------------------------------------------------
# CLI


cli_app = typer.Typer()
register(cli_app, typer.Typer())
runner = CliRunner()


def cli(url: str, *args: str) -> Any:
    return runner.invoke(cli_app, [*args, "--db", url], env={"COLUMNS": "250"})


def test_cli_runs_list_and_show(url):
    with open_store(url) as store:
        run_id = store.runs.start("luna", algorithm="ppo", env_id="tether/Lunabotics-v0", config={"seed": 1})
        for step in (1, 2, 3):
            store.runs.log_metrics(run_id, step, {"loss": 1.0 / step, "return": 10.0 * step})
        store.outcomes.write(1, 5.0, 100, success=True, run_id=run_id)
        store.runs.finish(run_id, "completed", {"return_mean": 30.0})
        store.models.register("luna", "p.onnx", parent_run_id=run_id)
    result = cli(url, "runs", "list")
    assert result.exit_code == 0, result.output
    assert "luna" in result.output and "completed" in result.output

    result = cli(url, "runs", "list", "--json")
    listed = json.loads(result.output)
    assert [r["id"] for r in listed] == [run_id] and listed[0]["summary"] == {"return_mean": 30.0}

    result = cli(url, "runs", "show", run_id, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["latest_metrics"]["loss"] == {"step": 3, "value": 1.0 / 3}
    assert shown["config"] == {"seed": 1} and shown["models"] == ["luna@1"]
    assert shown["outcomes"]["episodes"] == 1 and shown["metric_rows"] == 6

    result = cli(url, "runs", "show", run_id, "--key", "return", "--last", "2", "--json")
    assert [p["step"] for p in json.loads(result.output)["history"]] == [2, 3]
    result = cli(url, "runs", "show", run_id)
    assert result.exit_code == 0 and "Latest metrics" in result.output

    result = cli(url, "runs", "show", "ghost")
    assert isinstance(result.exception, StoreError) and "No run 'ghost'" in str(result.exception)
    result = cli(url, "runs", "list", "--status", "exploded")
    assert isinstance(result.exception, StoreError)


def test_cli_models_register_promote_archive(url, tmp_path):
    art = tmp_path / "tank.onnx"
    result = cli(url, "models", "register", "tank", str(art), "--algorithm", "dqn", "--archetype", "tank",
                 "--tag", "fp16", "--tag", "v2")  # fmt: skip
    assert result.exit_code == 0 and "tank@1" in result.output
    assert cli(url, "models", "register", "tank", str(art)).exit_code == 0
    result = cli(url, "models", "promote", "tank", "1")
    assert result.exit_code == 0 and "tank@1 is now in production" in result.output
    result = cli(url, "models", "promote", "tank", "2")
    assert "tank@1 archived" in result.output
    shown = json.loads(cli(url, "models", "show", "tank@production", "--json").output)
    assert shown["version"] == 2 and shown["stage"] == "production"
    shown = json.loads(cli(url, "models", "show", "tank@1", "--json").output)
    assert shown["stage"] == "archived" and shown["tags"] == ["fp16", "v2"] and shown["archetype"] == "tank"
    listed = json.loads(cli(url, "models", "list", "--stage", "production", "--json").output)
    assert [(m["name"], m["version"]) for m in listed] == [("tank", 2)]
    assert cli(url, "models", "archive", "tank", "2").exit_code == 0
    assert json.loads(cli(url, "models", "list", "--stage", "production", "--json").output) == []
    result = cli(url, "models", "list")
    assert result.exit_code == 0 and "tank" in result.output
    result = cli(url, "models", "show", "tank")
    assert result.exit_code == 0 and "Model tank@2" in result.output
    for bad in (("show", "nope"), ("show", "tank@7"), ("show", "tank@live"), ("promote", "tank", "9")):
        result = cli(url, "models", *bad)
        assert isinstance(result.exception, StoreError), (bad, result.output)


def test_cli_store_stats_and_export(url, tmp_path):
    with open_store(url) as store:
        store.experience.write("rover", make_batch(40, seed=3))
    stats = json.loads(cli(url, "store", "stats", "--json", "--sources").output)
    assert stats["rows"]["ml_experience_replay"] == 40 and stats["sources"] == {"rover": 40}
    assert stats["experience_table"] == "plain table"
    result = cli(url, "store", "stats")
    assert result.exit_code == 0 and "plain table" in result.output

    out = tmp_path / "rover.npz"
    result = cli(url, "store", "export", "--format", "npz", "--out", str(out), "--source", "rover")
    assert result.exit_code == 0, result.output
    assert "Exported 40 transitions" in result.output
    assert_same(read_npz(out)[0].obs, make_batch(40, seed=3).obs)
    result = cli(url, "store", "export", "--format", "parquet", "--out", str(out))
    assert isinstance(result.exception, StoreError) and "pyarrow" in str(result.exception)


def test_cli_errors_are_one_line_and_exit_2():
    """Through the real entry point (`tether.cli.main`), as a user would run it."""
    code = "import tether.cli as c; c.COMMAND_MODULES[:] = ['tether.commands.store']; c.main()"
    for args, fix in (
        (["store", "stats", "--db", "mysql://u@h/db"], "SQLite or PostgreSQL"),
        (["runs", "list", "--db", "postgresql+psycopg://postgres@127.0.0.1:1/test"], "start PostgreSQL"),
    ):
        env = {**os.environ, "COLUMNS": "400"}  # rich wraps at 80 columns when stderr is a pipe
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env
        )
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and fix in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
