"""Several hosts drained at once through the gRPC API: every drain ends, every VM moves once.

Real agents on test:/// hosts, the coordinator's real journal, executor and
servicer, and a simulated cloud (tests/coordinator/simdriver.py) whose
migrations take the model's predicted time scaled down. Correctness only: the
figures come from tools/bench_coordinator_load.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostmaint.coordinator import views
from hostmaint.coordinator.journal import STEP_DONE, STEP_FAILED
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.loadcluster import (
    Layout,
    SimCoordinator,
    SimReport,
    drain_all,
    drain_policy,
    simulated,
    verify,
)

SOURCES, VMS_PER_SOURCE, TARGETS = 5, 10, 3


@pytest.fixture
def layout() -> Layout:
    return Layout.build(SOURCES, VMS_PER_SOURCE, TARGETS)


@pytest.fixture
def coordinator(tmp_path: Path, layout: Layout) -> Iterator[SimCoordinator]:
    with simulated(tmp_path, layout, time_scale=0.01, poll_interval_s=0.05) as coordinator:
        yield coordinator


def test_concurrent_drains_complete_and_move_every_vm_once(
    coordinator: SimCoordinator, layout: Layout
) -> None:
    results = drain_all(
        f"127.0.0.1:{coordinator.port}",
        list(layout.sources),
        drain_policy(layout.targets),
        timeout_s=120,
    )
    assert [r.host for r in results] == list(layout.sources)
    for r in results:
        assert r.error == "", r.error
        assert r.final is not None
        assert r.final.state == cpb.DRAIN_STATE_COMPLETED, r.host
        assert r.final.summary.migrated == VMS_PER_SOURCE
        assert r.final.summary.failed == 0
        assert r.kinds["DRAIN_EVENT_KIND_MIGRATION_STARTED"] == VMS_PER_SOURCE
        assert r.kinds["DRAIN_EVENT_KIND_MIGRATION_COMPLETED"] == VMS_PER_SOURCE
        assert r.kinds["DRAIN_EVENT_KIND_FINISHED"] == 1
        assert r.kinds["DRAIN_EVENT_KIND_RETRIED"] == 0
    assert len({r.drain_id for r in results}) == SOURCES

    driver = coordinator.driver
    placement = driver.placement()
    sim = SimReport(placement, driver.moves(), driver.migrations_started)
    # Every VM is on exactly one host, a target, reached by exactly one migration.
    assert len(placement) == layout.vm_count
    assert set(placement.values()) <= set(layout.targets)
    assert Counter(m.instance_uuid for m in sim.moves) == Counter(placement.keys())
    assert all(m.source != m.target for m in sim.moves)
    assert driver.migrations_started == layout.vm_count
    for r in results:
        assert not driver.host_enabled(r.host)
        assert coordinator.journal.lock_holder(r.host) is None
    # The journal agrees with the cloud, and no step was carried out twice.
    assert verify(layout, results, coordinator.journal, sim) == []


def test_verify_reports_a_lost_vm_and_a_second_move(
    coordinator: SimCoordinator, layout: Layout
) -> None:
    """The consistency check itself: it passes a good drain and names what is wrong."""
    host = next(iter(layout.sources))
    results = drain_all(
        f"127.0.0.1:{coordinator.port}", [host], drain_policy(layout.targets), timeout_s=120
    )
    one = Layout({host: layout.sources[host]}, layout.targets, 0, 0)
    mine = {d.uuid for d in layout.sources[host]}
    driver = coordinator.driver
    placement = {u: h for u, h in driver.placement().items() if u in mine}
    moves = [m for m in driver.moves() if m.instance_uuid in mine]
    assert verify(one, results, coordinator.journal, SimReport(placement, moves, len(moves))) == []
    lost = moves[0].instance_uuid
    bad = SimReport(
        {u: h for u, h in placement.items() if u != lost}, [*moves, moves[1]], len(moves) + 1
    )
    problems = verify(one, results, coordinator.journal, bad)
    assert any("lost or gained" in p for p in problems), problems
    assert any("twice" in p for p in problems), problems
    assert any("migrations started" in p for p in problems), problems
    assert any(lost in p for p in problems), problems


def test_a_drain_whose_coordinator_died_while_planning_resumes_with_no_step_left_open(
    coordinator: SimCoordinator, layout: Layout
) -> None:
    """Killed between journaling the disable_host intent and its outcome: the next leader
    disables the host again (idempotent), plans, drains, and ends the dead one's intent."""
    host = next(iter(layout.sources))
    journal = coordinator.journal
    drain = journal.create_drain(host, views.policy_to_json(drain_policy(layout.targets)), "x")
    dead = journal.begin_step(drain.id, "disable_host", detail={"reason": "x"})

    assert coordinator.executor.resume_all() == [drain.id]
    assert coordinator.executor.wait(drain.id, 120)

    assert journal.drain(drain.id).state == "completed"
    assert not coordinator.driver.host_enabled(host)
    steps = journal.steps(drain.id)
    assert [s.state for s in steps if s.id == dead] == [STEP_FAILED]
    assert not [s for s in steps if s.state not in (STEP_DONE, STEP_FAILED)]
    disables = [s for s in steps if s.action == "disable_host" and s.state == STEP_DONE]
    assert len(disables) == 1
    moved = {s.vm_uuid for s in steps if s.action == "start_migration" and s.state == STEP_DONE}
    assert moved == {d.uuid for d in layout.sources[host]}
