"""Alembic environment for Tether's store.

Tether runs migrations itself when a store is opened (`tether.store.engine.upgrade_schema`), handing
an open connection in `config.attributes["connection"]`; no alembic.ini is needed. Developers who
add a revision can still use the alembic CLI with `-x url=...` pointing at a scratch database.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from tether.store.engine import VERSION_TABLE, parse_url, resolve_url
from tether.store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
elif context.is_offline_mode():
    url = context.get_x_argument(as_dictionary=True).get("url") or resolve_url()
    context.configure(url=str(parse_url(url)), target_metadata=target_metadata, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or resolve_url()
    engine = create_engine(parse_url(url))
    with engine.begin() as conn:
        _run(conn)
