"""Sustained insert rate of 28-D transitions into the store, SQLite and PostgreSQL side by side.

Each row: obs 28 float32, action 3 float32, reward, next obs 28 float32, terminated, truncated,
source/episode/step and a timestamp (~300 bytes on disk with the index). For each backend it
measures, in the same run:

* `store.experience.write` with `--batch` rows per call (one transaction per call): sustained
  rows/s over `--rows` rows — the figure compared with the issue's targets
  (>= 50,000 rows/s PostgreSQL, >= 100,000 rows/s SQLite);
* the background writer fed with small batches (`--small` rows, e.g. one vector-env step) that
  it groups into transactions of up to `--batch` rows: rows/s from the first submit until
  `flush()` returns;
* the peer: the obvious SQLAlchemy Core implementation (`conn.execute(insert(table), rows)` with
  one dict per row, same encoding of arrays to bytes), on `--peer-rows` rows.

Rates are wall-clock; "cpu" is rows per CPU-second of this process (the database server's CPU is
not included for PostgreSQL). The machine's load average is printed because other processes
share the cores.

    .venv/bin/python benchmarks/bench_store.py [--rows 500000] [--batch 10000] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np
from sqlalchemy import insert, text

from tether.algos.base import Transitions
from tether.store import open_store
from tether.store.experience import EXP

TARGETS = {"sqlite": 100_000, "postgresql": 50_000}


def make_batches(n_batches: int, rows: int) -> list[Transitions]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_batches):
        out.append(
            Transitions(
                obs=rng.standard_normal((rows, 28), dtype=np.float32),
                action=rng.uniform(-1, 1, (rows, 3)).astype(np.float32),
                reward=rng.standard_normal(rows).astype(np.float32),
                next_obs=rng.standard_normal((rows, 28), dtype=np.float32),
                terminated=rng.random(rows) < 0.01,
                truncated=rng.random(rows) < 0.005,
            )
        )
    return out


def timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    """(rows, wall seconds, CPU seconds of this process)."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    rows = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return rows, wall, cpu


def server_cpu(store: Any) -> Callable[[], float] | None:
    """CPU seconds used so far by this store's PostgreSQL backend process, when it runs on this
    machine (read from /proc); None otherwise."""
    if store.backend != "postgresql":
        return None
    with store.read() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        return None
    tick = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    return read


def bench_direct(url: str, batches: list[Transitions], total: int) -> tuple[int, float, float, float | None]:
    with open_store(url) as store:
        server = server_cpu(store)
        s0 = server() if server else 0.0

        def run() -> int:
            done = 0
            k = 0
            while done < total:
                batch = batches[k % len(batches)]
                store.experience.write("bench", batch, episode=k, step=np.arange(len(batch)))
                done += len(batch)
                k += 1
            return done

        rows, wall, cpu = timed(run)
        return rows, wall, cpu, (server() - s0) if server else None


def bench_writer(
    url: str, small: list[Transitions], total: int, batch_rows: int
) -> tuple[int, float, float, Any]:
    with open_store(url) as store:
        writer = store.writer(max_batch_rows=batch_rows, max_queue_rows=8 * batch_rows, block_s=5.0)

        def run() -> int:
            done = 0
            k = 0
            while done < total:
                batch = small[k % len(small)]
                if (
                    writer.write_transitions("bench-writer", batch, episode=k // 1000, step=k % 1000)
                    is not None
                ):
                    done += len(batch)
                k += 1
            writer.flush()
            return done

        rows, wall, cpu = timed(run)
        stats = writer.stats()
        writer.close()
        return rows, wall, cpu, stats


def bench_peer(url: str, batches: list[Transitions], total: int) -> tuple[int, float, float]:
    """The obvious implementation: SQLAlchemy Core executemany with a dict per row."""
    with open_store(url) as store:

        def run() -> int:
            done = 0
            k = 0
            while done < total:
                b = batches[k % len(batches)]
                # make_batches gives array observations (a Transitions may also hold dicts)
                obs, next_obs = cast(np.ndarray, b.obs), cast(np.ndarray, b.next_obs)
                ts = datetime.now(timezone.utc)
                rows = [
                    {
                        "source": "peer",
                        "episode": k,
                        "step": i,
                        "obs": obs[i].tobytes(),
                        "next_obs": next_obs[i].tobytes(),
                        "obs_shape": "[28]",
                        "obs_dtype": "<f4",
                        "action": b.action[i].tobytes(),
                        "action_shape": "[3]",
                        "action_dtype": "<f4",
                        "reward": float(b.reward[i]),
                        "terminated": bool(b.terminated[i]),
                        "truncated": bool(b.truncated[i]),
                        "created_at": ts,
                        "extra": None,
                    }
                    for i in range(len(b))
                ]
                with store.write_tx() as conn:
                    conn.execute(insert(EXP), rows)
                done += len(b)
                k += 1
            return done

        return timed(run)


def pg_url(explicit: str | None) -> tuple[str, Callable[[], None] | None] | None:
    """The given URL, else a fresh schema in the local `test` database (dropped at the end)."""
    if explicit:
        return explicit, None
    import psycopg

    for user in ("postgres", "root"):
        dsn = f"host=127.0.0.1 port=5432 dbname=test user={user} connect_timeout=3"
        try:
            conn = psycopg.connect(dsn, autocommit=True)
        except Exception:
            continue
        schema = f"tether_bench_{uuid.uuid4().hex[:8]}"
        conn.execute(f'CREATE SCHEMA "{schema}"')

        def drop(conn: Any = conn, schema: str = schema) -> None:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            conn.close()

        return f"postgresql+psycopg://{user}@127.0.0.1:5432/test?options=-csearch_path%3D{schema}", drop
    return None


def report(label: str, rows: int, wall: float, cpu: float, target: int | None, peer: float | None) -> None:
    rate = rows / wall
    parts = [f"  {label:<34} {rate:>10,.0f} rows/s  (cpu {rows / cpu:>9,.0f} rows/cpu-s, {rows:,} rows)"]
    if target:
        parts.append(f" = {rate / target:.2f}x target {target:,}")
    if peer:
        parts.append(f" = {rate / peer:.1f}x peer")
    print("".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=500_000, help="rows per measurement")
    parser.add_argument("--batch", type=int, default=10_000, help="rows per transaction")
    parser.add_argument("--small", type=int, default=64, help="rows per background-writer submit")
    parser.add_argument("--peer-rows", type=int, default=60_000, help="rows for the SQLAlchemy Core peer")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("TETHER_BENCH_PG"),
        help="PostgreSQL URL (default: a temporary schema in the local `test` database)",
    )
    args = parser.parse_args()

    batches = make_batches(8, args.batch)
    small = make_batches(64, args.small)
    print(f"28-D transitions; batch {args.batch:,} rows per transaction; load average {os.getloadavg()}")
    for backend in args.backends.split(","):
        cleanup: Callable[[], None] | None = None
        if backend == "sqlite":
            tmp = Path(tempfile.mkdtemp(prefix="tether-bench-"))
            url = f"sqlite:///{tmp / 'bench.db'}"
        elif backend == "postgresql":
            found = pg_url(args.pg_url)
            if found is None:
                print("postgresql: no server at 127.0.0.1:5432 (skipped)")
                continue
            url, cleanup = found
        else:
            raise SystemExit(f"unknown backend {backend!r}")
        try:
            print(f"{backend}:")
            peer_rows, peer_wall, peer_cpu = bench_peer(url, batches, args.peer_rows)
            peer_rate = peer_rows / peer_wall
            rows, wall, cpu, server = bench_direct(url, batches, args.rows)
            report(f"experience.write, batch {args.batch:,}", rows, wall, cpu, TARGETS[backend], peer_rate)
            if server:
                print(
                    f"  {'':<34} (PostgreSQL backend process: {rows / server:,.0f} rows per server CPU-s; "
                    f"client + server {rows / (cpu + server):,.0f} rows/cpu-s)"
                )
            rows, wall, cpu, stats = bench_writer(url, small, args.rows, args.batch)
            report(f"writer, {args.small}-row submits", rows, wall, cpu, TARGETS[backend], peer_rate)
            print(
                f"  {'':<34} ({stats.transactions} transactions, {stats.dropped_batches} dropped, "
                f"{stats.failed_batches} failed)"
            )
            report("peer: SQLAlchemy Core executemany", peer_rows, peer_wall, peer_cpu, None, None)
        finally:
            if cleanup is not None:
                cleanup()
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
