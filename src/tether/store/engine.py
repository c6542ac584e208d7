"""Database URLs, engines and schema migrations, with one-sentence errors for every way they fail.

URL resolution: an explicit URL (the `--db` option), else the `TETHER_DB` environment variable,
else an SQLite file `tether.db` in the data directory (`ML_DATA_DIR`, default `./data`).
`postgresql://` and `postgres://` URLs use psycopg 3 (`postgresql+psycopg://`); psycopg is an
optional extra (`pip install 'tether[pg]'`) and is imported only when a PostgreSQL URL is opened.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from tether.errors import TetherError

log = logging.getLogger(__name__)

ENV_URL = "TETHER_DB"
ENV_DATA_DIR = "ML_DATA_DIR"
DEFAULT_DB_FILE = "tether.db"
# Our own version table, so a database shared with another Alembic user never collides.
VERSION_TABLE = "tether_alembic_version"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# How long an SQLite connection waits for another process's lock before it reports one.
SQLITE_LOCK_WAIT_S = 30.0
# Serialises concurrent first-time migrations of one PostgreSQL database (any constant works).
_MIGRATION_LOCK_KEY = 0x7E7E_0004
# The newest migration in migrations/versions (a test checks it matches Alembic's own head), so
# opening a current database needs one query and no Alembic import.
SCHEMA_HEAD = "0001_initial"
_URL_HELP = "use sqlite:///path/to/file.db or postgresql+psycopg://user@host:5432/dbname"


class StoreError(TetherError):
    """The store cannot do what was asked; the message is one sentence that names the fix."""


def data_dir() -> Path:
    return Path(os.environ.get(ENV_DATA_DIR) or "data")


def resolve_url(url: str | None = None) -> str:
    """The URL to use: the argument, else `TETHER_DB`, else the default SQLite file."""
    if url is not None and url.strip():
        return url.strip()
    env = os.environ.get(ENV_URL, "").strip()
    if env:
        return env
    return f"sqlite:///{data_dir() / DEFAULT_DB_FILE}"


def safe_url(url: URL | str) -> str:
    """The URL with any password masked, for messages and logs."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


def parse_url(url: str) -> URL:
    """Parse and normalise a store URL; anything but SQLite or PostgreSQL+psycopg is refused."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"Database URL {safe_url(url)!r} is not a valid URL; {_URL_HELP}.") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise StoreError(
                f"Database driver {driver!r} is not supported for PostgreSQL; Tether uses psycopg 3: "
                f"write the URL as postgresql+psycopg://... and run pip install 'tether[pg]'."
            )
        parsed = parsed.set(drivername="postgresql+psycopg")
        if not parsed.database:
            raise StoreError(
                f"Database URL {safe_url(parsed)!r} names no database; add one, as in "
                "postgresql+psycopg://user@host:5432/dbname."
            )
    elif backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise StoreError(
                f"Database driver {driver!r} is not supported for SQLite; write the URL as "
                "sqlite:///path/to/file.db."
            )
        parsed = parsed.set(drivername="sqlite")
        if parsed.database in (None, "", ":memory:"):
            # Each pooled connection (the writer thread's too) would see its own empty database.
            raise StoreError(
                "In-memory SQLite cannot be shared by the store's threads; give a file path, "
                "as in sqlite:///path/to/file.db."
            )
    else:
        raise StoreError(
            f"Database URL scheme {parsed.drivername!r} is not supported; Tether stores to SQLite or "
            f"PostgreSQL: {_URL_HELP}."
        )
    return parsed


def _sqlite_path(url: URL) -> Path | None:
    db = url.database or ""
    if db in ("", ":memory:") or db.startswith("file:"):
        return None
    return Path(db)


def _require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise StoreError(
            "The PostgreSQL driver (psycopg 3) is not installed; run pip install 'tether[pg]' "
            "or use an SQLite URL."
        ) from None


def create_store_engine(url: URL) -> Engine:
    """An engine tuned for the store: SQLite in WAL mode, PostgreSQL with a connect timeout."""
    if url.get_backend_name() == "sqlite":
        path = _sqlite_path(url)
        if path is not None:
            parent = path.expanduser().resolve().parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"Cannot create the directory {parent} for the SQLite database ({exc.strerror}); "
                    f"choose a writable path with --db or {ENV_DATA_DIR}."
                ) from None
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_LOCK_WAIT_S}, pool_pre_ping=False
        )
        _install_sqlite_hooks(engine)
        return engine
    _require_psycopg()
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = 5
    try:
        return create_engine(url, connect_args=connect_args, pool_pre_ping=True)
    except NoSuchModuleError:
        raise StoreError(
            "The PostgreSQL driver (psycopg 3) is not installed; run pip install 'tether[pg]'."
        ) from None


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # We issue BEGIN ourselves (below) so transactions are real and writers can take the
        # write lock up front with BEGIN IMMEDIATE instead of failing on a lock upgrade.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            # First, so every pragma below (WAL needs a lock on a fresh file) waits for other openers.
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_LOCK_WAIT_S * 1000)}")
            # Big pages for a new file (no effect on an existing one): experience rows are ~300
            # bytes and appended in bulk; 64 KiB pages insert ~20% faster than the default 4 KiB.
            cur.execute("PRAGMA page_size=65536")
            _enable_wal(cur)
            # FULL: a commit is on disk when it returns, so "reported committed" survives power loss.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.execute("PRAGMA cache_size=-65536")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("tether_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _enable_wal(cur: sqlite3.Cursor, wait_s: float = SQLITE_LOCK_WAIT_S) -> None:
    """Switch the file to WAL, waiting like busy_timeout would for other openers of a fresh file.

    SQLite answers "database is locked" at once, without calling the busy handler, when another
    connection is converting the same new file to WAL at that moment; four threads opening one
    fresh database through the store hit this in 7 rounds of 100.
    """
    deadline = time.monotonic() + wait_s
    delay = 0.001
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def describe_error(exc: BaseException, url: URL) -> StoreError:
    """Turn a driver/SQLAlchemy exception raised while connecting into one clear sentence."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    msg = str(orig).strip()
    low = msg.lower()
    where = safe_url(url)
    if url.get_backend_name() == "sqlite":
        path = _sqlite_path(url)
        if "not a database" in low or "malformed" in low:
            return StoreError(
                f"The file {path} is not a usable SQLite database ({msg.splitlines()[0]}); "
                "point --db at a different file or move this one away."
            )
        if "unable to open" in low or "readonly" in low or "read-only" in low:
            return StoreError(
                f"Cannot open the SQLite database {path} ({msg.splitlines()[0]}); choose a writable "
                f"file path with --db or {ENV_DATA_DIR}."
            )
        if "locked" in low or "busy" in low:
            return StoreError(
                f"The SQLite database {path} stayed locked by another process for "
                f"{SQLITE_LOCK_WAIT_S:g} s; stop the other writer or use PostgreSQL for many "
                "concurrent writers."
            )
        return StoreError(f"SQLite database {path} failed: {msg.splitlines()[0]}.")
    host = url.host or "localhost (unix socket)"
    port = url.port or 5432
    hostport = f"{host}:{port}" if url.host else host
    if "does not exist" in low and "database" in low:
        return StoreError(
            f"PostgreSQL at {hostport} has no database {url.database!r}; create it "
            f"(createdb {url.database}) or fix the database name in the URL."
        )
    if "role" in low and "does not exist" in low:
        return StoreError(
            f"PostgreSQL at {hostport} has no user {url.username!r}; fix the user in the URL "
            f"({where}) or create the role."
        )
    if "password authentication failed" in low or "no password supplied" in low or "pg_hba" in low:
        return StoreError(
            f"PostgreSQL at {hostport} rejected user {url.username!r} (authentication failed); "
            "fix the user and password in the URL or the server's pg_hba.conf."
        )
    if (
        "connection refused" in low
        or "could not connect" in low
        or "timeout" in low
        or "timed out" in low
        or "could not translate host name" in low
        or "name or service not known" in low
        or "no route to host" in low
        or "network is unreachable" in low
    ):
        return StoreError(
            f"Cannot reach PostgreSQL at {hostport}; start PostgreSQL there or fix the URL "
            f"(--db or {ENV_URL})."
        )
    first = msg.splitlines()[0] if msg else type(orig).__name__
    return StoreError(f"PostgreSQL at {hostport} refused the connection ({first}); check the URL {where}.")


def check_connection(engine: Engine) -> None:
    """Connect once so a wrong URL fails now, with a clear message, not deep inside a trainer."""
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                schema = conn.execute(text("SELECT current_schema()")).scalar()
                if schema is None:
                    path = conn.execute(text("SHOW search_path")).scalar()
                    raise StoreError(
                        f"No schema of the PostgreSQL search_path ({path}) exists; create it "
                        "(CREATE SCHEMA name) or fix options=-csearch_path=... in the URL."
                    )
            else:
                conn.execute(text("SELECT count(*) FROM sqlite_master")).scalar()
    except StoreError:
        raise
    except (DBAPIError, sqlite3.Error) as exc:
        raise describe_error(exc, engine.url) from None


# ---------------------------------------------------------------------------------------------
# Migrations


def _import_alembic() -> None:
    # Alembic logs a line per built-in plugin at INFO when first imported; that is noise for a CLI.
    plugin_log = logging.getLogger("alembic.runtime.plugins")
    level = plugin_log.level
    plugin_log.setLevel(logging.WARNING)
    try:
        importlib.import_module("alembic.command")
        importlib.import_module("alembic.script")
    finally:
        plugin_log.setLevel(level)


def _alembic_config(connection: Any) -> Any:
    _import_alembic()
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("version_table", VERSION_TABLE)
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """Alembic's view of the newest revision (SCHEMA_HEAD must equal it)."""
    _import_alembic()
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(None)).get_current_head()
    assert head is not None
    return head


def current_revision(conn: Any) -> str | None:
    """The schema revision recorded in the database, or None for a database without our tables."""
    from sqlalchemy import inspect

    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def upgrade_schema(engine: Engine) -> str:
    """Bring the schema to the newest revision (`alembic upgrade head`); returns that revision.

    Fast path: one small query when the database is already current. Concurrent openers of a fresh
    database serialise on a lock (BEGIN IMMEDIATE / an advisory lock) and the loser finds it done.
    """
    head = SCHEMA_HEAD
    with engine.connect() as conn:
        if current_revision(conn) == head:
            return head
    _import_alembic()
    from alembic import command
    from alembic.util.exc import CommandError

    conn_opts = {"tether_begin": "IMMEDIATE"} if engine.dialect.name == "sqlite" else {}
    try:
        with engine.connect().execution_options(**conn_opts) as conn, conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            current = current_revision(conn)
            if current == head:
                return head
            log.info(
                "%s the store schema in %s (%s -> %s)",
                "Creating" if current is None else "Upgrading",
                safe_url(engine.url),
                current or "empty",
                head,
            )
            # Alembic narrates each step at INFO; our one line above says what happened.
            migration_log = logging.getLogger("alembic.runtime.migration")
            level = migration_log.level
            migration_log.setLevel(logging.WARNING)
            try:
                command.upgrade(_alembic_config(conn), "head")
            finally:
                migration_log.setLevel(level)
    except CommandError as exc:
        if "Can't locate revision" in str(exc):
            raise StoreError(
                f"The database {safe_url(engine.url)} has a newer Tether schema than this version "
                "knows; upgrade Tether (pip install -U tether) or use another database."
            ) from None
        raise StoreError(f"Schema migration failed ({exc}); check the database.") from None
    except SQLAlchemyError as exc:
        msg = (str(getattr(exc, "orig", exc)).splitlines() or [type(exc).__name__])[0]
        where = safe_url(engine.url)
        if "already exists" in msg:
            raise StoreError(
                f"The database {where} already has a table Tether wants to create "
                f"({msg}); give Tether its own schema (postgresql URL option "
                "options=-csearch_path%3Dtether) or its own database."
            ) from None
        if "permission denied" in msg.lower() or "readonly" in msg.lower() or "read-only" in msg.lower():
            raise StoreError(
                f"Tether may not create its tables in {where} ({msg}); grant the user CREATE on "
                "the schema, or point --db at a database it may write."
            ) from None
        raise StoreError(f"Creating Tether's tables in {where} failed ({msg}); check the database.") from None
    return head
