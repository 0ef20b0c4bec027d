"""The drain journal on real databases: a SQLite file and a PostgreSQL cluster."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest

from hostmaint.coordinator import errors
from hostmaint.coordinator.journal import Journal, VmRow, make_engine


@pytest.fixture
def journal(db_url: str) -> Iterator[Journal]:
    ticks = itertools.count(1000)
    engine = make_engine(db_url)
    yield Journal(engine, clock=lambda: float(next(ticks)))
    engine.dispose()


def test_one_drain_per_host(journal: Journal) -> None:
    first = journal.create_drain("host1", "{}", "firmware")
    with pytest.raises(errors.DrainConflict) as info:
        journal.create_drain("host1", "{}", "again")
    assert info.value.drain_id == first.id
    other = journal.create_drain("host2", "{}", "")
    assert other.id != first.id
    journal.finish_drain(first.id, "host1", "completed")
    assert journal.create_drain("host1", "{}", "").id != first.id
    assert journal.drain(first.id).state == "completed"


def test_racing_creators_get_one_drain(db_url: str) -> None:
    engines = [make_engine(db_url) for _ in range(4)]
    journals = [Journal(e, clock=lambda: 1.0) for e in engines]
    won: list[str] = []
    lost: list[str] = []
    barrier = threading.Barrier(len(journals))

    def create(j: Journal) -> None:
        barrier.wait()
        try:
            won.append(j.create_drain("h", "{}", "").id)
        except errors.DrainConflict as e:
            lost.append(e.drain_id)

    threads = [threading.Thread(target=create, args=(j,)) for j in journals]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in engines:
        e.dispose()
    assert len(won) == 1
    assert lost == won * 3


def test_plan_rows_are_saved_once(journal: Journal) -> None:
    d = journal.create_drain("h", "{}", "")
    rows = [VmRow(d.id, f"vm-{i}", f"n{i}", i, "queued", "h") for i in range(3)]
    journal.save_plan(d.id, "{}", rows)
    journal.update_vm(d.id, "vm-1", state="completed", tuning_applied=["raise_downtime=900"])
    journal.save_plan(d.id, "{}", rows)  # a resumed drain re-plans: rows stay as they are
    got = journal.vms(d.id)
    assert [(v.vm_uuid, v.state) for v in got] == [
        ("vm-0", "queued"),
        ("vm-1", "completed"),
        ("vm-2", "queued"),
    ]
    assert got[1].tuning_applied == ("raise_downtime=900",)
    assert journal.drain(d.id).state == "running"


def test_steps_intent_then_outcome(journal: Journal) -> None:
    d = journal.create_drain("h", "{}", "")
    a = journal.begin_step(d.id, "disable_host", detail={"reason": "x"})
    b = journal.begin_step(d.id, "start_migration", "vm-1", {"attempt": 1})
    journal.end_step(a, True, "disabled")
    assert [s.id for s in journal.open_steps(d.id)] == [b]
    journal.end_step(b, False, "409")
    steps = journal.steps(d.id)
    assert [(s.action, s.state, s.result) for s in steps] == [
        ("disable_host", "done", "disabled"),
        ("start_migration", "failed", "409"),
    ]
    assert steps[1].detail == {"attempt": 1}


def test_active_drains_and_cancel(journal: Journal) -> None:
    d = journal.create_drain("h", "{}", "")
    assert [x.id for x in journal.active_drains()] == [d.id]
    journal.request_cancel(d.id, abort_running=True)
    row = journal.drain(d.id)
    assert row.cancel_requested and row.abort_running
    journal.finish_drain(d.id, "h", "cancelled")
    assert journal.active_drains() == []
    assert journal.lock_holder("h") is None


def test_disabled_hosts(journal: Journal) -> None:
    assert journal.disabled_reason("h") is None
    journal.disable_host("h", "kernel update")
    assert journal.disabled_reason("h") == "kernel update"
    journal.enable_host("h")
    assert journal.disabled_reason("h") is None


def test_unknown_drain(journal: Journal) -> None:
    with pytest.raises(errors.DrainNotFound):
        journal.drain("nope")
