"""The journal's Alembic revisions against journal.py's tables, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from hostmaint.coordinator import migrations
from hostmaint.coordinator.journal import Journal, metadata
from hostmaint.coordinator.migrations import cli
from tests.coordinator.pgcluster import PostgresCluster


def schema_diffs(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))


def test_head_schema_is_the_metadata(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    assert migrations.current(engine) is None
    assert migrations.upgrade(engine) == migrations.head()
    assert schema_diffs(engine) == []
    engine.dispose()


def test_every_revision_downgrades_and_upgrades_again(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    migrations.upgrade(engine)
    with engine.begin() as conn:
        command.downgrade(migrations.alembic_config(conn), "base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    assert migrations.current(engine) is None
    migrations.upgrade(engine)
    assert schema_diffs(engine) == []
    engine.dispose()


def test_journal_made_before_migrations_is_stamped_and_kept(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    # how the journal was created before revisions existed: the tables of the first
    # revision's metadata, and no alembic_version
    migrations.upgrade(engine, migrations.BASELINE_REVISION)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE alembic_version"))
    first = Journal(engine, clock=lambda: 1.0)
    drain = first.create_drain("h", "{}", "kept")
    Journal(engine, clock=lambda: 2.0)  # a restart of the upgraded journal
    assert migrations.current(engine) == migrations.head()
    assert first.drain(drain.id).reason == "kept"
    assert schema_diffs(engine) == []
    engine.dispose()


def test_a_drain_journaled_at_revision_0001_keeps_its_rows_without_settings(db_url: str) -> None:
    """Upgraded, its VMs have no planned settings (a resumed drain plans again for them)."""
    engine = sa.create_engine(db_url)
    migrations.upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO drains (id, host, state, policy, reason, plan, created_at, "
                "cancel_requested, abort_running, error) VALUES ('d', 'h', 'running', '{}', "
                "'', '{}', 1.0, false, false, '')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO drain_vms (drain_id, vm_uuid, name, position, state, source_host, "
                "planned_target, target_host, attempts, tuning, predicted_total_s, "
                "predicted_downtime_ms, actual_total_s, actual_downtime_ms, tuning_applied, "
                "error, migration_ref) VALUES ('d', 'v', 'v', 0, 'queued', 'h', 't', '', 0, "
                "'none', 1.0, 1.0, 0.0, 0.0, '[]', '', '')"
            )
        )
    journal = Journal(engine, clock=lambda: 2.0)
    assert migrations.current(engine) == migrations.head()
    (row,) = journal.vms("d")
    assert (row.vm_uuid, row.planned_target, row.planned) == ("v", "t", "")
    journal.update_vm("d", "v", planned='{"settings": {}}')
    assert journal.vm("d", "v").planned == '{"settings": {}}'
    engine.dispose()


def test_without_upgrade_an_old_schema_is_refused(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    with pytest.raises(migrations.SchemaOutOfDate) as info:
        Journal(engine, clock=lambda: 1.0, upgrade=False)
    assert info.value.current is None
    assert info.value.head == migrations.head()
    migrations.upgrade(engine)
    Journal(engine, clock=lambda: 1.0, upgrade=False).create_drain("h", "{}", "")
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.timeout(120)  # without the schema lock the creators block one another
def test_coordinators_starting_together_upgrade_once(postgres_cluster: PostgresCluster) -> None:
    """Coordinators sharing one PostgreSQL journal may start at the same time."""
    db_url = postgres_cluster.create_database()
    engines = [sa.create_engine(db_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    failures: list[BaseException] = []

    def start(engine: sa.Engine) -> None:
        barrier.wait()
        try:
            Journal(engine, clock=lambda: 1.0)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            failures.append(e)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert migrations.current(engines[0]) == migrations.head()
    for e in engines:
        e.dispose()


def test_operator_upgrades_with_the_db_command(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "coordinator.conf"
    conf.write_text(f"[database]\nurl = {db_url}\n")
    args = ["--config-file", str(conf)]
    assert cli.main([*args, "current"]) == 1
    assert cli.main([*args, "upgrade"]) == 0
    assert cli.main([*args, "current"]) == 0
    head = migrations.head()
    assert capsys.readouterr().out.splitlines() == [
        f"none (newest: {head})",
        head,
        f"{head} (newest: {head})",
    ]
    engine = sa.create_engine(db_url)
    Journal(engine, clock=lambda: 1.0, upgrade=False).create_drain("h", "{}", "")
    engine.dispose()
