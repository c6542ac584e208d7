"""Experience (`ml_experience_replay`) and episode outcomes (`ml_episode_outcomes`).

Writes are batched: one `write()` is one transaction. PostgreSQL rows go in with one binary
`COPY ... FROM STDIN` whose bytes numpy lays out for the whole batch at once; SQLite rows with one
`executemany` of a prepared INSERT. Reads decode blobs back into numpy arrays bit for bit.

Row layout of an observation for other programs: `obs` holds `prod(shape) * itemsize` bytes, C
order, in the byte order and type named by `obs_dtype` (Tether writes little-endian, e.g. `<f4`),
with `obs_shape` a JSON array such as `[28]`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
from sqlalchemy import Connection, func, insert, select

from tether.store._util import as_utc, check_json, check_name, to_json_text, utcnow
from tether.store.engine import StoreError
from tether.store.models import Base, EpisodeOutcome, Experience

if TYPE_CHECKING:
    from tether.algos.base import Transitions
    from tether.store.api import Store

log = logging.getLogger(__name__)

EXP = Base.metadata.tables[Experience.__tablename__]
OUT = Base.metadata.tables[EpisodeOutcome.__tablename__]

# Column order of the COPY/INSERT; `extra` last so per-row JSON is a suffix of each row.
_COLUMNS = (
    "source",
    "episode",
    "step",
    "obs",
    "next_obs",
    "obs_shape",
    "obs_dtype",
    "action",
    "action_shape",
    "action_dtype",
    "reward",
    "terminated",
    "truncated",
    "created_at",
    "extra",
)
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
_ALLOWED_KINDS = "biuf"
MAX_ARRAY_DIMS = 8
MAX_ROW_BYTES = 64 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Encoding


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def _little_endian(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype.kind not in _ALLOWED_KINDS:
        raise StoreError(
            f"The {what} array has dtype {arr.dtype}; the store keeps bool, integer and float arrays only."
        )
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    # Always a private, contiguous copy: callers reuse their rollout buffers right after submitting.
    return np.array(arr, order="C", copy=True)


def _per_row(value: int | Sequence[int] | np.ndarray, n: int, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full(n, arr)
    if arr.shape != (n,):
        raise StoreError(f"The {what} must be one integer or one per row ({n}); got shape {arr.shape}.")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise StoreError(f"The {what} must be integers; got dtype {arr.dtype}.")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise StoreError(f"The {what} does not fit a 64-bit integer.")
    return arr.astype(np.int64)


@dataclass
class EncodedExperience:
    """A validated private copy of one batch, ready to insert (built in the caller's thread)."""

    source: str
    obs: np.ndarray
    next_obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    extra: str | list[str | None] | None
    created_at: datetime = field(default_factory=utcnow)

    @property
    def rows(self) -> int:
        return int(self.reward.shape[0])


def encode_experience(
    source: str,
    batch: Transitions,
    *,
    episode: int | Sequence[int] | np.ndarray = 0,
    step: int | Sequence[int] | np.ndarray = 0,
    extra: Mapping[str, Any] | None = None,
    include_extras: bool = False,
) -> EncodedExperience:
    """Validate a batch and copy it into the store's layout; raises StoreError on bad input."""
    check_name(source, "experience source")
    reward = np.asarray(batch.reward)
    if reward.ndim != 1:
        raise StoreError(f"Transitions.reward must be 1-D (one per row); got shape {reward.shape}.")
    n = int(reward.shape[0])
    obs = np.asarray(batch.obs)
    next_obs = np.asarray(batch.next_obs)
    action = np.asarray(batch.action)
    for what, arr in (("obs", obs), ("next_obs", next_obs), ("action", action)):
        if arr.ndim < 1 or arr.shape[0] != n:
            rows = arr.shape[0] if arr.ndim else 0
            raise StoreError(f"Transitions.{what} has {rows} rows but reward has {n}; pass equal lengths.")
        if arr.ndim - 1 > MAX_ARRAY_DIMS:
            raise StoreError(
                f"Transitions.{what} has {arr.ndim - 1} dimensions per row; "
                f"the store allows {MAX_ARRAY_DIMS}."
            )
        if n and arr[0].nbytes > MAX_ROW_BYTES:
            raise StoreError(
                f"One Transitions.{what} row is {arr[0].nbytes} bytes; the store allows {MAX_ROW_BYTES}."
            )
    if obs.shape != next_obs.shape or obs.dtype != next_obs.dtype:
        raise StoreError(
            f"Transitions.obs {obs.shape} {obs.dtype} and next_obs {next_obs.shape} {next_obs.dtype} differ; "
            "they must have the same shape and dtype."
        )
    if reward.dtype.kind not in "biuf":
        raise StoreError(f"Transitions.reward must be numeric; got dtype {reward.dtype}.")
    reward = reward.astype(np.float64)
    if not np.all(np.isfinite(reward)):
        raise StoreError(
            "Transitions.reward contains NaN or infinity; the store accepts finite rewards only."
        )
    flags = []
    for what in ("terminated", "truncated"):
        arr = np.asarray(getattr(batch, what))
        if arr.shape != (n,):
            raise StoreError(f"Transitions.{what} must have shape ({n},); got {arr.shape}.")
        flags.append(arr.astype(bool))

    extra_text: str | list[str | None] | None = None
    per_row = {k: np.asarray(v) for k, v in (batch.extras.items() if include_extras else ())}
    for key, arr in per_row.items():
        if arr.ndim < 1 or arr.shape[0] != n:
            raise StoreError(
                f"Transitions.extras[{key!r}] must have one entry per row ({n}); got {arr.shape}."
            )
    if extra is not None and not isinstance(extra, Mapping):
        raise StoreError(f"extra must be a dict of JSON values; got {type(extra).__name__}.")
    base = check_json(dict(extra), "experience extra") if extra else {}
    if per_row:
        columns = {k: v.tolist() for k, v in per_row.items()}
        extra_text = [
            to_json_text({**base, **{k: col[i] for k, col in columns.items()}}, "extras") for i in range(n)
        ]
    elif base:
        extra_text = to_json_text(base, "experience extra")

    return EncodedExperience(
        source=source,
        obs=_little_endian(obs, "obs"),
        next_obs=_little_endian(next_obs, "next_obs"),
        action=_little_endian(action, "action"),
        reward=reward,
        terminated=flags[0],
        truncated=flags[1],
        episode=_per_row(episode, n, "episode"),
        step=_per_row(step, n, "step"),
        extra=extra_text,
    )


def merge_key(batch: EncodedExperience) -> tuple[Any, ...]:
    """Batches with equal keys can be inserted as one (same source and array layouts)."""
    return (batch.source, batch.obs.shape[1:], batch.obs.dtype, batch.action.shape[1:], batch.action.dtype)


def merge_encoded(batches: Sequence[EncodedExperience]) -> EncodedExperience:
    """Concatenate batches of equal `merge_key` (the first batch's `created_at` stamps them all)."""
    if len(batches) == 1:
        return batches[0]
    extras = [b.extra for b in batches]
    extra: str | list[str | None] | None
    if all(e is None for e in extras):
        extra = None
    elif all(isinstance(e, str) for e in extras) and len(set(extras)) == 1:
        extra = extras[0]
    else:
        extra = []
        for b in batches:
            extra.extend(b.extra if isinstance(b.extra, list) else [b.extra] * b.rows)
    return EncodedExperience(
        source=batches[0].source,
        obs=np.concatenate([b.obs for b in batches]),
        next_obs=np.concatenate([b.next_obs for b in batches]),
        action=np.concatenate([b.action for b in batches]),
        reward=np.concatenate([b.reward for b in batches]),
        terminated=np.concatenate([b.terminated for b in batches]),
        truncated=np.concatenate([b.truncated for b in batches]),
        episode=np.concatenate([b.episode for b in batches]),
        step=np.concatenate([b.step for b in batches]),
        extra=extra,
        created_at=batches[0].created_at,
    )


def _row_bytes(arr: np.ndarray) -> list[bytes]:
    """Split an (N, ...) contiguous array into N bytes objects without a Python loop over elements."""
    n = arr.shape[0]
    width = arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    if width == 0:
        return [b""] * n
    rows = arr.reshape(n, -1).view(np.dtype((np.void, width))).ravel().tolist()
    return cast("list[bytes]", rows)  # a void array's items are bytes


def _sqlite_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sqlite_time(ts: datetime) -> str:
    # SQLAlchemy's own SQLite DateTime text format, in UTC.
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def insert_sqlite(conn: Connection, batch: EncodedExperience) -> None:
    """One executemany; per-batch constants are inlined as literals (fewer binds per row is faster)."""
    n = batch.rows
    if n == 0:
        return
    constant_episode = bool(np.all(batch.episode == batch.episode[0]))
    values = {
        "source": _sqlite_literal(batch.source),
        "episode": str(int(batch.episode[0])) if constant_episode else "?",
        "step": "?",
        "obs": "?",
        "next_obs": "?",
        "obs_shape": _sqlite_literal(_shape_text(batch.obs.shape[1:])),
        "obs_dtype": _sqlite_literal(batch.obs.dtype.str),
        "action": "?",
        "action_shape": _sqlite_literal(_shape_text(batch.action.shape[1:])),
        "action_dtype": _sqlite_literal(batch.action.dtype.str),
        "reward": "?",
        "terminated": "?",
        "truncated": "?",
        "created_at": _sqlite_literal(_sqlite_time(batch.created_at)),
        "extra": "NULL"
        if batch.extra is None
        else (_sqlite_literal(batch.extra) if isinstance(batch.extra, str) else "?"),
    }
    sql = (
        f"INSERT INTO ml_experience_replay ({', '.join(_COLUMNS)}) "
        f"VALUES ({', '.join(values[c] for c in _COLUMNS)})"
    )
    columns: list[Any] = []
    if not constant_episode:
        columns.append(batch.episode.tolist())
    columns += [
        batch.step.tolist(),
        _row_bytes(batch.obs),
        _row_bytes(batch.next_obs),
        _row_bytes(batch.action),
        batch.reward.tolist(),
        batch.terminated.tolist(),
        batch.truncated.tolist(),
    ]
    if isinstance(batch.extra, list):
        columns.append(batch.extra)
    raw = conn.connection.driver_connection
    cur = raw.cursor()  # type: ignore[union-attr]
    try:
        cur.executemany(sql, zip(*columns, strict=True))
    finally:
        cur.close()


def _pg_text_field(prefix: str, value: bytes) -> list[tuple[str, str]]:
    # Never empty here: sources are non-empty and shapes/dtypes always have text ("[]", "<f4").
    return [(f"{prefix}_len", ">i4"), (prefix, f"S{len(value)}")]


def pg_copy_payload(batch: EncodedExperience) -> bytes:
    """The whole batch as PostgreSQL binary COPY data, laid out by numpy (no per-row Python)."""
    n = batch.rows
    src = batch.source.encode()
    texts = {
        "obs_shape": _shape_text(batch.obs.shape[1:]).encode(),
        "obs_dtype": batch.obs.dtype.str.encode(),
        "action_shape": _shape_text(batch.action.shape[1:]).encode(),
        "action_dtype": batch.action.dtype.str.encode(),
    }
    obs_w = batch.obs[0].nbytes if n else 0
    act_w = batch.action[0].nbytes if n else 0
    fields: list[tuple[str, str]] = [("nfields", ">i2")]
    fields += _pg_text_field("source", src)
    fields += [("episode_len", ">i4"), ("episode", ">i8"), ("step_len", ">i4"), ("step", ">i8")]
    fields += [("obs_len", ">i4"), ("obs", f"V{obs_w}"), ("next_obs_len", ">i4"), ("next_obs", f"V{obs_w}")]
    fields += _pg_text_field("obs_shape", texts["obs_shape"]) + _pg_text_field(
        "obs_dtype", texts["obs_dtype"]
    )
    fields += [("action_len", ">i4"), ("action", f"V{act_w}")]
    fields += _pg_text_field("action_shape", texts["action_shape"])
    fields += _pg_text_field("action_dtype", texts["action_dtype"])
    fields += [("reward_len", ">i4"), ("reward", ">f8")]
    fields += [("terminated_len", ">i4"), ("terminated", "u1"), ("truncated_len", ">i4"), ("truncated", "u1")]
    fields += [("created_at_len", ">i4"), ("created_at", ">i8")]
    constant_extra = None if isinstance(batch.extra, list) else batch.extra
    extra_bytes = b"\x01" + constant_extra.encode() if constant_extra is not None else b""
    if not isinstance(batch.extra, list):
        fields += [("extra_len", ">i4")]
        if extra_bytes:
            fields += [("extra", f"S{len(extra_bytes)}")]
    rows = np.zeros(n, dtype=np.dtype(fields))
    rows["nfields"] = len(_COLUMNS)
    rows["source_len"] = len(src)
    rows["source"] = src
    rows["episode_len"] = 8
    rows["episode"] = batch.episode
    rows["step_len"] = 8
    rows["step"] = batch.step
    for name, arr, width in (
        ("obs", batch.obs, obs_w),
        ("next_obs", batch.next_obs, obs_w),
        ("action", batch.action, act_w),
    ):
        rows[f"{name}_len"] = width
        if width:
            rows[name] = arr.reshape(n, -1).view(np.dtype((np.void, width))).ravel()
    for name, value in texts.items():
        rows[f"{name}_len"] = len(value)
        rows[name] = value
    rows["reward_len"] = 8
    rows["reward"] = batch.reward
    rows["terminated_len"] = 1
    rows["terminated"] = batch.terminated
    rows["truncated_len"] = 1
    rows["truncated"] = batch.truncated
    rows["created_at_len"] = 8
    rows["created_at"] = (batch.created_at - _PG_EPOCH) // _MICROSECOND
    if not isinstance(batch.extra, list):
        rows["extra_len"] = len(extra_bytes) if extra_bytes else -1
        if extra_bytes:
            rows["extra"] = extra_bytes
        body = rows.tobytes()
    else:
        # Per-row JSON: the fixed part of each row, then its extra field (length + jsonb version 1).
        fixed = _row_bytes(rows.view(np.uint8).reshape(n, -1)) if n else []
        parts: list[bytes] = []
        for head, text_ in zip(fixed, batch.extra, strict=True):
            parts.append(head)
            if text_ is None:
                parts.append(b"\xff\xff\xff\xff")
            else:
                data = b"\x01" + text_.encode()
                parts.append(len(data).to_bytes(4, "big") + data)
        body = b"".join(parts)
    return b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00" + body + b"\xff\xff"


def insert_postgres(conn: Connection, batch: EncodedExperience) -> None:
    if batch.rows == 0:
        return
    payload = pg_copy_payload(batch)
    raw = conn.connection.driver_connection
    sql = f"COPY ml_experience_replay ({', '.join(_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
    with raw.cursor() as cur, cur.copy(sql) as copy:  # type: ignore[union-attr]
        copy.write(payload)


def insert_experience(conn: Connection, batch: EncodedExperience) -> None:
    if conn.dialect.name == "postgresql":
        insert_postgres(conn, batch)
    else:
        insert_sqlite(conn, batch)


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass
class ExperienceChunk:
    """Rows read back: the transitions plus where each row came from."""

    ids: np.ndarray
    sources: list[str]
    episodes: np.ndarray
    steps: np.ndarray
    created_at: list[datetime]
    transitions: Transitions
    extras: list[Any] | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _parse_shape(text_: Any, row_id: int, column: str) -> tuple[int, ...]:
    try:
        dims = json.loads(text_) if isinstance(text_, str) else None
    except ValueError:
        dims = None
    if (
        not isinstance(dims, list)
        or len(dims) > MAX_ARRAY_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in dims)
    ):
        raise StoreError(
            f"Row {row_id} of ml_experience_replay has {column}={text_!r}; it must be a JSON list of "
            "non-negative integers such as [28]; fix or delete that row."
        )
    return tuple(dims)


def _parse_dtype(text_: Any, row_id: int, column: str) -> np.dtype:
    try:
        dt = np.dtype(text_) if isinstance(text_, str) and len(text_) <= 8 else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in _ALLOWED_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise StoreError(
            f"Row {row_id} of ml_experience_replay has {column}={text_!r}; it must name a numeric numpy "
            "dtype such as <f4 or |u1; fix or delete that row."
        )
    return dt


def _decode_blobs(
    blobs: list[Any], ids: list[int], shape: tuple[int, ...], dtype: np.dtype, column: str
) -> np.ndarray:
    n = len(blobs)
    width = dtype.itemsize * math.prod(shape)
    lengths = np.fromiter((len(b) if b is not None else -1 for b in blobs), dtype=np.int64, count=n)
    bad = np.flatnonzero(lengths != width)
    if bad.size:
        i = int(bad[0])
        raise StoreError(
            f"Row {ids[i]} of ml_experience_replay has a {lengths[i]}-byte {column} but shape "
            f"{list(shape)} and dtype {dtype.str} need {width} bytes; fix or delete that row."
        )
    arr = np.frombuffer(b"".join(bytes(b) for b in blobs), dtype=dtype).reshape((n, *shape))
    native = dtype.newbyteorder("=") if dtype.byteorder not in ("|", "=") else dtype
    return arr.astype(native, copy=True)


def _extras_arrays(extras: list[Any]) -> dict[str, np.ndarray]:
    """Numeric per-row extras present in every row, as arrays (float32 / int64 / bool)."""
    if not extras or any(not isinstance(e, dict) for e in extras):
        return {}
    keys = set(extras[0])
    for e in extras[1:]:
        keys &= set(e)
    out: dict[str, np.ndarray] = {}
    for key in sorted(keys):
        values = [e[key] for e in extras]
        try:
            arr = np.asarray(values)
        except ValueError:
            continue
        if arr.dtype.kind == "b":
            out[key] = arr
        elif arr.dtype.kind in "iu":
            out[key] = arr.astype(np.int64)
        elif arr.dtype.kind == "f":
            out[key] = arr.astype(np.float32)
    return out


def decode_rows(rows: Sequence[Any], *, with_extras: bool, reward_dtype: np.dtype) -> ExperienceChunk:
    """Rows of (id, source, episode, step, obs, next_obs, obs_shape, obs_dtype, action,
    action_shape, action_dtype, reward, terminated, truncated, created_at[, extra])."""
    ids = [r[0] for r in rows]
    specs: dict[tuple, int] = {}
    for r in rows:
        specs.setdefault((r[6], r[7], r[9], r[10]), r[0])
    parsed = [
        (
            _parse_shape(spec[0], row_id, "obs_shape"),
            _parse_dtype(spec[1], row_id, "obs_dtype"),
            _parse_shape(spec[2], row_id, "action_shape"),
            _parse_dtype(spec[3], row_id, "action_dtype"),
        )
        for spec, row_id in specs.items()
    ]
    if len(set(parsed)) > 1:
        shapes = sorted({f"obs {list(p[0])} {p[1].str} / action {list(p[2])} {p[3].str}" for p in parsed})[:3]
        raise StoreError(
            f"The selected experience mixes array shapes ({'; '.join(shapes)}); load one source at a "
            "time (--source KEY)."
        )
    if parsed:
        obs_shape, obs_dtype, act_shape, act_dtype = parsed[0]
    else:
        obs_shape, obs_dtype, act_shape, act_dtype = (0,), np.dtype(np.float32), (), np.dtype(np.float32)
    obs = _decode_blobs([r[4] for r in rows], ids, obs_shape, obs_dtype, "obs")
    next_obs = _decode_blobs([r[5] for r in rows], ids, obs_shape, obs_dtype, "next_obs")
    action = _decode_blobs([r[8] for r in rows], ids, act_shape, act_dtype, "action")
    n = len(rows)
    extras_raw: list[Any] | None = None
    if with_extras:
        extras_raw = [r[15] for r in rows]  # already decoded by the JSON column type
    from tether.algos.base import Transitions  # imports torch; only when data is actually read

    transitions = Transitions(
        obs=obs,
        action=action,
        reward=np.fromiter((r[11] for r in rows), dtype=np.float64, count=n).astype(reward_dtype),
        next_obs=next_obs,
        terminated=np.fromiter((bool(r[12]) for r in rows), dtype=bool, count=n),
        truncated=np.fromiter((bool(r[13]) for r in rows), dtype=bool, count=n),
        extras=_extras_arrays(extras_raw) if extras_raw else {},
    )
    return ExperienceChunk(
        ids=np.asarray(ids, dtype=np.int64),
        sources=[r[1] for r in rows],
        episodes=np.fromiter((r[2] for r in rows), dtype=np.int64, count=n),
        steps=np.fromiter((r[3] for r in rows), dtype=np.int64, count=n),
        created_at=[as_utc(r[14]) for r in rows],  # type: ignore[misc]
        transitions=transitions,
        extras=extras_raw,
    )


@dataclass
class SourceSummary:
    source: str
    rows: int
    first_id: int
    last_id: int


@dataclass
class Outcome:
    """How one episode ended."""

    episode: int
    episode_return: float
    length: int
    success: bool | None = None
    run_id: str | None = None
    source: str | None = None
    archetype: str | None = None
    tags: list[str] | None = None
    created_at: datetime | None = None
    id: int | None = None


# ---------------------------------------------------------------------------------------------
# Repositories


class SupportsAdd(Protocol):
    """A replay buffer (for example `tether.buffers.replay.ReplayBuffer`)."""

    def add(self, batch: Transitions) -> None: ...


class ExperienceRepo:
    """`store.experience`: write transitions and read them back as numpy arrays."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def write(
        self,
        source: str,
        batch: Transitions,
        *,
        episode: int | Sequence[int] | np.ndarray = 0,
        step: int | Sequence[int] | np.ndarray = 0,
        extra: Mapping[str, Any] | None = None,
        include_extras: bool = False,
    ) -> int:
        """Store a batch in one transaction (synchronously; see `store.writer()` for background).

        `episode` and `step` are one integer for every row or one per row (for consecutive steps
        of one episode pass `step=np.arange(s0, s0 + len(batch))`). `extra` is JSON merged into
        every row's `extra`; with `include_extras` the batch's own per-row `Transitions.extras`
        (e.g. PPO's logp/value) are added too (off by default: JSON per row costs ~5 µs a row).
        Returns the number of rows written.
        """
        encoded = encode_experience(
            source, batch, episode=episode, step=step, extra=extra, include_extras=include_extras
        )
        with self._store.write_tx() as conn:
            insert_experience(conn, encoded)
        return encoded.rows

    def _filters(self, source: str | None, after_id: int | None, until_id: int | None) -> list[Any]:
        conds: list[Any] = []
        if source is not None:
            conds.append(EXP.c.source == source)
        if after_id is not None:
            conds.append(EXP.c.id > after_id)
        if until_id is not None:
            conds.append(EXP.c.id <= until_id)
        return conds

    def count(self, source: str | None = None) -> int:
        with self._store.read() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(EXP).where(*self._filters(source, None, None))
                ).scalar_one()
            )

    def max_id(self, source: str | None = None) -> int | None:
        with self._store.read() as conn:
            return conn.execute(select(func.max(EXP.c.id)).where(*self._filters(source, None, None))).scalar()

    def sources(self) -> list[SourceSummary]:
        """Every source key with its row count (a full scan on big tables)."""
        stmt = (
            select(EXP.c.source, func.count(), func.min(EXP.c.id), func.max(EXP.c.id))
            .group_by(EXP.c.source)
            .order_by(EXP.c.source)
        )
        with self._store.read() as conn:
            return [SourceSummary(s, int(n), int(lo), int(hi)) for s, n, lo, hi in conn.execute(stmt)]

    def iter_chunks(
        self,
        source: str | None = None,
        *,
        chunk_rows: int = 65536,
        after_id: int | None = None,
        until_id: int | None = None,
        with_extras: bool = False,
        reward_dtype: type | np.dtype = np.float32,
    ) -> Iterator[ExperienceChunk]:
        """Rows in id (insertion) order, `chunk_rows` at a time, with their source/episode/step.

        The end is fixed when iteration starts (rows written meanwhile are not included), and
        memory stays bounded by one chunk however big the table is.
        """
        if chunk_rows < 1:
            raise StoreError(f"chunk_rows must be at least 1; got {chunk_rows}.")
        if until_id is None:
            until_id = self.max_id(source)
            if until_id is None:
                return
        cols = [
            EXP.c.id, EXP.c.source, EXP.c.episode, EXP.c.step, EXP.c.obs, EXP.c.next_obs,
            EXP.c.obs_shape, EXP.c.obs_dtype, EXP.c.action, EXP.c.action_shape, EXP.c.action_dtype,
            EXP.c.reward, EXP.c.terminated, EXP.c.truncated, EXP.c.created_at,
        ]  # fmt: skip
        if with_extras:
            cols.append(EXP.c.extra)
        last = after_id
        rdt = np.dtype(reward_dtype)
        while True:
            stmt = (
                select(*cols)
                .where(*self._filters(source, last, until_id))
                .order_by(EXP.c.id)
                .limit(chunk_rows)
            )
            with self._store.read() as conn:
                rows = conn.execute(stmt).all()
            if not rows:
                return
            yield decode_rows(rows, with_extras=with_extras, reward_dtype=rdt)
            last = rows[-1][0]
            if len(rows) < chunk_rows:
                return

    def iter_transitions(
        self, source: str | None = None, *, chunk_rows: int = 65536, **kw: Any
    ) -> Iterator[Transitions]:
        """`Transitions` batches of up to `chunk_rows` rows, oldest first (for big tables)."""
        for chunk in self.iter_chunks(source, chunk_rows=chunk_rows, **kw):
            yield chunk.transitions

    def load_transitions(
        self,
        source: str | None = None,
        *,
        newest: int | None = None,
        with_extras: bool = False,
        reward_dtype: type | np.dtype = np.float32,
    ) -> Transitions:
        """All matching rows (or only the `newest` N) as one `Transitions`, oldest first.

        Rewards are stored as double precision and returned as `reward_dtype` (float32 by default,
        exact for rewards that were float32). With `with_extras`, numeric per-row extras present in
        every row come back in `Transitions.extras` (floats as float32).
        """
        after_id = self._newest_after(source, newest)
        chunks = list(
            self.iter_chunks(
                source,
                chunk_rows=262144,
                after_id=after_id,
                with_extras=with_extras,
                reward_dtype=reward_dtype,
            )
        )
        if not chunks:
            return decode_rows([], with_extras=False, reward_dtype=np.dtype(reward_dtype)).transitions
        if len(chunks) == 1:
            return chunks[0].transitions
        return concat_transitions([c.transitions for c in chunks])

    def _newest_after(self, source: str | None, newest: int | None) -> int | None:
        """The id after which the `newest` rows start (None: from the beginning)."""
        if newest is None:
            return None
        if newest < 1:
            raise StoreError(f"newest must be at least 1; got {newest}.")
        stmt = select(EXP.c.id).where(*self._filters(source, None, None)).order_by(EXP.c.id.desc())
        with self._store.read() as conn:
            return conn.execute(stmt.offset(newest).limit(1)).scalar()

    def load_into(
        self,
        buffer: SupportsAdd,
        source: str | None = None,
        *,
        newest: int | None = None,
        chunk_rows: int = 65536,
    ) -> int:
        """Feed stored rows, oldest first, to `buffer.add(batch)`; returns how many.

        Each batch carries `extras["stream"]`: one integer per (source, episode), so an n-step
        buffer chains consecutive steps of one episode and never joins two episodes. For that,
        write each episode's steps in order and give concurrent episodes distinct numbers.
        """
        streams: dict[tuple[str, int], int] = {}
        total = 0
        after_id = self._newest_after(source, newest)
        for chunk in self.iter_chunks(source, chunk_rows=chunk_rows, after_id=after_id):
            ids = np.fromiter(
                (
                    streams.setdefault((s, int(e)), len(streams))
                    for s, e in zip(chunk.sources, chunk.episodes, strict=True)
                ),
                dtype=np.int64,
                count=len(chunk),
            )
            batch = chunk.transitions
            batch.extras = {**batch.extras, "stream": ids}
            buffer.add(batch)
            total += len(chunk)
        return total


def concat_transitions(parts: Sequence[Transitions]) -> Transitions:
    shapes = set()
    for p in parts:
        obs = np.asarray(p.obs)  # read-back rows: always one array, the store keeps no Dict spaces
        shapes.add((obs.shape[1:], obs.dtype, p.action.shape[1:], p.action.dtype))
    if len(shapes) > 1:
        raise StoreError(
            "The selected experience mixes array shapes; load one source at a time (--source KEY)."
        )
    keys = set(parts[0].extras)
    for p in parts[1:]:
        keys &= set(p.extras)
    from tether.algos.base import Transitions

    return Transitions(
        obs=np.concatenate([p.obs for p in parts]),
        action=np.concatenate([p.action for p in parts]),
        reward=np.concatenate([p.reward for p in parts]),
        next_obs=np.concatenate([p.next_obs for p in parts]),
        terminated=np.concatenate([p.terminated for p in parts]),
        truncated=np.concatenate([p.truncated for p in parts]),
        extras={k: np.concatenate([p.extras[k] for p in parts]) for k in sorted(keys)},
    )


def _outcome_row(o: Outcome) -> dict[str, Any]:
    if o.source is not None:
        check_name(o.source, "outcome source")
    if o.run_id is not None:
        check_name(o.run_id, "run id", max_len=128)
    if o.archetype is not None:
        check_name(o.archetype, "archetype", max_len=64)
    ret = float(o.episode_return)
    if not math.isfinite(ret):
        raise StoreError(f"Episode {o.episode} has a non-finite return {ret}; pass a finite number.")
    if int(o.length) < 0:
        raise StoreError(f"Episode {o.episode} has a negative length {o.length}.")
    tags = o.tags
    if tags is not None and (not isinstance(tags, list | tuple) or not all(isinstance(t, str) for t in tags)):
        raise StoreError(f"Outcome tags must be a list of strings; got {tags!r}.")
    return {
        "run_id": o.run_id,
        "source": o.source,
        "episode": int(o.episode),
        "episode_return": ret,
        "length": int(o.length),
        "success": None if o.success is None else bool(o.success),
        "archetype": o.archetype,
        "tags": list(tags) if tags is not None else None,
        "created_at": o.created_at or utcnow(),
    }


def insert_outcomes(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(insert(OUT), rows)


class OutcomeRepo:
    """`store.outcomes`: one row per finished episode."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def write(
        self,
        episode: int,
        episode_return: float,
        length: int,
        *,
        success: bool | None = None,
        run_id: str | None = None,
        source: str | None = None,
        archetype: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        self.write_many([Outcome(episode, episode_return, length, success, run_id, source, archetype, tags)])

    def write_many(self, outcomes: Sequence[Outcome]) -> int:
        rows = [_outcome_row(o) for o in outcomes]
        with self._store.write_tx() as conn:
            insert_outcomes(conn, rows)
        return len(rows)

    def list(
        self,
        *,
        run_id: str | None = None,
        source: str | None = None,
        archetype: str | None = None,
        limit: int = 100,
    ) -> list[Outcome]:
        """The newest outcomes first."""
        stmt = select(OUT).order_by(OUT.c.id.desc()).limit(limit)
        if run_id is not None:
            stmt = stmt.where(OUT.c.run_id == run_id)
        if source is not None:
            stmt = stmt.where(OUT.c.source == source)
        if archetype is not None:
            stmt = stmt.where(OUT.c.archetype == archetype)
        with self._store.read() as conn:
            return [
                Outcome(
                    episode=r.episode,
                    episode_return=r.episode_return,
                    length=r.length,
                    success=r.success,
                    run_id=r.run_id,
                    source=r.source,
                    archetype=r.archetype,
                    tags=r.tags,
                    created_at=as_utc(r.created_at),
                    id=r.id,
                )
                for r in conn.execute(stmt)
            ]

    def count(self, run_id: str | None = None) -> int:
        stmt = select(func.count()).select_from(OUT)
        if run_id is not None:
            stmt = stmt.where(OUT.c.run_id == run_id)
        with self._store.read() as conn:
            return int(conn.execute(stmt).scalar_one())
