"""The drain journal's schema migrations (Alembic), applied from inside hostmaint.

The coordinator upgrades its journal to the newest revision when it starts
(`[database] auto_upgrade`, on by default). Where schema changes are applied by
an operator instead, `hostmaint-coordinator-db upgrade` does it and a
coordinator refuses to start on an older schema.

A journal made before the migrations existed (its tables created straight from
the metadata) holds exactly the first revision's schema: it is stamped with
that revision, then upgraded like any other.

On PostgreSQL, an upgrade holds a transaction-scoped advisory lock, so
coordinators starting together apply each revision once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

LOG = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(__file__).resolve().parent
BASELINE_REVISION = "0001"
# Any fixed 64-bit key: the journal's schema lock among all advisory locks.
_PG_LOCK_KEY = 0x686D_6A6F_7572_6E01


class SchemaOutOfDate(Exception):
    """The journal's schema is not the one this coordinator was written for."""

    def __init__(self, current: str | None, head: str) -> None:
        super().__init__(
            f"journal schema is at revision {current or 'none'}, this coordinator needs "
            f"{head}: run `hostmaint-coordinator-db upgrade` or set [database] auto_upgrade"
        )
        self.current = current
        self.head = head


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    rev = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert rev is not None, "the migrations have no head"
    return rev


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def current(engine: Engine) -> str | None:
    """The revision the journal's database is at (None: no journal there yet)."""
    with engine.connect() as conn:
        return _current(conn)


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Brings the journal's schema to `revision`; returns the revision it is at then."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        cfg = alembic_config(conn)
        before = _current(conn)
        if before is None and sa.inspect(conn).has_table("drains"):
            LOG.info("journal without revision: stamping revision=%s", BASELINE_REVISION)
            command.stamp(cfg, BASELINE_REVISION)
            before = BASELINE_REVISION
        command.upgrade(cfg, revision)
        after = _current(conn)
    if after != before:
        LOG.info("journal schema upgraded from=%s to=%s", before or "none", after)
    assert after is not None
    return after


def check(engine: Engine) -> None:
    """SchemaOutOfDate unless the journal's schema is at the newest revision."""
    now, want = current(engine), head()
    if now != want:
        raise SchemaOutOfDate(now, want)
