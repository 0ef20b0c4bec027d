"""A drain whose plan moves a VM by post-copy, on real QEMU through the coordinator.

The wide guest rewrites a 128 MiB working set at 80 MiB/s on a 400 Mbit/s link:
the agent's one-second dirty-rate window sees all of it (the set is larger than a
second of writes), and under a 300 ms limit no pre-copy setting converges (a
switch-over may carry about 10 MB; a 0.2 s round rewrites 16 MiB). The plan
tunes it for post-copy, and the executor switches it as soon as QEMU's first
pass over RAM is done, without waiting for it to fall behind.

The hot guest rewrites 32 MiB at 80 MiB/s: the one-second window already covers
its set, so its rate is known only to be at least 32 MiB/s. As slow as that it
would converge by pre-copy in a few rounds; the plan gives it those rounds
before its post-copy, and since it is faster than the link the executor
switches once they are spent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hostmaint.lab import cluster
from hostmaint.lab.demo import move_guests_to, placement, placement_problems
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.protos import coordinator_pb2 as cpb
from tests.lab.conftest import require_lab
from tests.lab.memcheck import assert_memory_intact
from tests.lab.test_drain_lab import Site, _drain_events, _print_vms

pytestmark = pytest.mark.lab
SUBNET = "10.213.23.0/24"
PREFIX = "hm-lpc"
LIMIT_MS = 300
WIDE = GuestSpec(f"{PREFIX}-wide", 256, 128, 80, GuestMode.PACED, 0)
HOT = GuestSpec(f"{PREFIX}-hot", 256, 32, 80, GuestMode.PACED, 0)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_lab()
    config = cluster.LabConfig(
        prefix=PREFIX, state_dir=tmp_path_factory.mktemp("lpc"), subnet=SUBNET
    )
    plans = [cluster.GuestPlan(WIDE, 0), cluster.GuestPlan(HOT, 1)]
    lab, report = cluster.Lab.up(2, plans, config)
    print(f"\nlab: accel={report.accel} ({report.accel_reason}) phases={report.phases_s}")
    assert not report.agent_failures, report.agent_failures
    try:
        yield Site(lab, tmp_path_factory.mktemp("lpc-work"))
    finally:
        lab.down()


def _drain_alone(
    site: Site, guest: GuestSpec, name: str
) -> tuple[cpb.PlannedMigration, cpb.DrainStatus, list[str]]:
    """Drains the source with only `guest` on it (the other guest on the other host):
    the guest's planned migration, the final status and the tuning messages."""
    source, other = site.lab.hosts
    move_guests_to(site.lab, [g.name for g in (WIDE, HOT) if g is not guest], other)
    move_guests_to(site.lab, [guest.name], source)
    coordinator = site.coordinator(name)
    coordinator.start()
    try:
        policy = cpb.DrainPolicy(max_downtime_ms=LIMIT_MS, allow_postcopy=True)
        events = _drain_events(coordinator.address, source.name, policy)
    finally:
        coordinator.stop()
    plan = next(e.plan for e in events if e.kind == cpb.DRAIN_EVENT_KIND_PLANNED)
    (planned,) = plan.migrations
    print(
        f"  plan: tuning={cpb.Tuning.Name(planned.tuning)} tries={planned.precopy_tries} "
        f"dirty={planned.dirty_rate_bytes_per_s / 2**20:.1f} MiB/s "
        f"pred={planned.predicted_total_s:.1f}s"
    )
    status = events[-1].status
    _print_vms(status)
    tuned = [e.message for e in events if e.kind == cpb.DRAIN_EVENT_KIND_TUNED]
    print(f"  tuned: {tuned}")
    assert status.state == cpb.DRAIN_STATE_COMPLETED, status
    assert placement_problems(placement(site.lab, [guest.name]), source.name) == []
    assert_memory_intact(site.lab, [WIDE.name, HOT.name])
    return planned, status, tuned


def test_a_vm_planned_for_postcopy_switches_after_its_first_pass(site: Site) -> None:
    planned, status, tuned = _drain_alone(site, WIDE, "postcopy")
    assert planned.tuning == cpb.TUNING_POSTCOPY and planned.precopy_tries == 0
    (vm,) = status.vms
    assert list(vm.tuning_applied) == ["postcopy"]
    assert "postcopy: planned: post-copy after the first pass" in tuned
    assert vm.actual_downtime_ms <= LIMIT_MS
    assert status.summary.postcopy_used == 1


def test_a_writer_known_from_below_gets_its_precopy_rounds_first(site: Site) -> None:
    planned, status, tuned = _drain_alone(site, HOT, "tries")
    assert planned.tuning == cpb.TUNING_POSTCOPY and planned.precopy_tries > 0
    (vm,) = status.vms
    assert list(vm.tuning_applied) == ["postcopy"]
    rounds = planned.precopy_tries
    steps = [t for t in tuned if not t.startswith("planned max downtime")]
    assert steps == [
        f"postcopy: planned: post-copy, pre-copy did not converge in {rounds} rounds after "
        "the first pass"
    ]
    assert vm.actual_downtime_ms <= LIMIT_MS
