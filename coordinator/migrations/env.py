"""Alembic's environment for the drain journal.

The journal (and `hostmaint-coordinator-db`) hand over an open connection in
a transaction through `config.attributes["connection"]`; nothing here reads a
URL or an ini file. Offline mode (SQL scripts) is not supported: the schema is
applied by the coordinator itself or by `hostmaint-coordinator-db upgrade`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from hostmaint.coordinator.journal import metadata


def run_online(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; use hostmaint-coordinator-db upgrade")
conn = context.config.attributes.get("connection")
if not isinstance(conn, Connection):
    raise SystemExit("the journal migrations run only with a connection from hostmaint")
run_online(conn)
