"""Drains of a real lab host through the coordinator, run as its own daemon.

One lab of three hosts for the module; every test starts with the guests on
host 0 (the previous test's moves are undone through the agents) and gets its
own coordinator process and journal. Among the guests is one that rewrites
its working set faster than the link carries it: without a raised downtime
limit it never converges. After each drain, every guest's own memory check
must have found no page lost or changed (tests/lab/memcheck.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from hostmaint.coordinator.cliview import FINISHED_DRAIN_STATES
from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.lab import cluster
from hostmaint.lab.demo import (
    CoordinatorProcess,
    coordinator_config,
    free_port,
    move_guests_to,
    placement,
    placement_problems,
)
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.lab.state import Role, stop_process
from hostmaint.protos import agent_pb2_grpc, coordinator_pb2_grpc
from hostmaint.protos import coordinator_pb2 as cpb
from tests.lab.conftest import require_lab
from tests.lab.memcheck import assert_memory_intact

pytestmark = pytest.mark.lab
SUBNET = "10.213.21.0/24"
PREFIX = "hm-ldt"
LIMIT_MS = 1000
T = 30
HOT = GuestSpec(f"{PREFIX}-hot", 256, 32, 80, GuestMode.PACED, 0)
GUESTS = [
    GuestSpec(f"{PREFIX}-fill", 256, 16, 2, GuestMode.PACED, 96),
    GuestSpec(f"{PREFIX}-busy", 256, 32, 12, GuestMode.PACED, 16),
    HOT,
    GuestSpec(f"{PREFIX}-cpu", 128, 16, 4, GuestMode.CPU, 0),
]
NAMES = [g.name for g in GUESTS]


@dataclass
class Site:
    lab: cluster.Lab
    work: Path

    @property
    def source(self) -> cluster.LabHost:
        return self.lab.hosts[0]

    def coordinator(self, name: str) -> CoordinatorProcess:
        """A coordinator of its own journal `name`.db, not yet started."""
        port = free_port()
        conf = self.work / f"{name}.conf"
        conf.write_text(
            coordinator_config(self.lab, self.work / f"{name}.db", port, max_downtime_ms=LIMIT_MS)
        )
        return CoordinatorProcess(conf, port, self.work / f"{name}.log")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_lab()
    config = cluster.LabConfig(
        prefix=PREFIX, state_dir=tmp_path_factory.mktemp("ldt"), subnet=SUBNET
    )
    lab, report = cluster.Lab.up(3, [cluster.GuestPlan(g, 0) for g in GUESTS], config)
    print(f"\nlab: accel={report.accel} ({report.accel_reason}) phases={report.phases_s}")
    assert not report.agent_failures, report.agent_failures
    try:
        yield Site(lab, tmp_path_factory.mktemp("ldt-work"))
    finally:
        lab.down()


def _stub(host: cluster.LabHost) -> tuple[grpc.Channel, agent_pb2_grpc.HostAgentStub]:
    channel = grpc.insecure_channel(host.agent_address)
    return channel, agent_pb2_grpc.HostAgentStub(channel)


@pytest.fixture(autouse=True)
def guests_home(site: Site) -> None:
    move_guests_to(site.lab, NAMES, site.source)


def _policy() -> cpb.DrainPolicy:
    return cpb.DrainPolicy(max_downtime_ms=LIMIT_MS)


def _drain_events(
    address: str, host: str, policy: cpb.DrainPolicy | None = None
) -> list[cpb.DrainEvent]:
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        request = cpb.DrainRequest(host=host, policy=policy or _policy(), reason="test")
        return list(stub.Drain(request))


def _get(address: str, host: str) -> cpb.DrainStatus:
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        status: cpb.DrainStatus = stub.GetDrain(cpb.GetDrainRequest(host=host), timeout=T)
        return status


def _assert_emptied(site: Site) -> None:
    assert placement_problems(placement(site.lab, NAMES), site.source.name) == []


def _print_vms(status: cpb.DrainStatus) -> None:
    for vm in status.vms:
        print(
            f"  {vm.name}: {vm.source_host}->{vm.target_host} tuning={vm.tuning} "
            f"applied={list(vm.tuning_applied)} pred={vm.predicted_total_s:.1f}s "
            f"actual={vm.actual_total_s:.1f}s downtime={vm.actual_downtime_ms}ms "
            f"attempts={vm.attempts} {vm.error}"
        )


def test_drain_empties_the_host_within_the_limit(site: Site) -> None:
    coordinator = site.coordinator("drain")
    coordinator.start()
    try:
        events = _drain_events(coordinator.address, site.source.name)
    finally:
        coordinator.stop()
    assert events[-1].kind == cpb.DRAIN_EVENT_KIND_FINISHED
    status = events[-1].status
    _print_vms(status)
    assert status.state == cpb.DRAIN_STATE_COMPLETED, status
    assert status.summary.migrated == len(GUESTS)
    assert status.summary.max_downtime_ms <= LIMIT_MS
    assert all(vm.actual_downtime_ms <= LIMIT_MS for vm in status.vms)
    hot = next(vm for vm in status.vms if vm.name == HOT.name)
    # The hot guest does not converge as it is: the plan tuned it, or the escalation did.
    assert list(hot.tuning_applied) or hot.tuning not in (cpb.TUNING_NONE, cpb.TUNING_UNSPECIFIED)
    _assert_emptied(site)
    assert_memory_intact(site.lab, NAMES)


def test_coordinator_killed_mid_drain_resumes_from_its_journal(site: Site) -> None:
    coordinator = site.coordinator("crash")
    coordinator.start()
    host = site.source.name
    address = coordinator.address
    channel = grpc.insecure_channel(address)
    stream = coordinator_pb2_grpc.CoordinatorStub(channel).Drain(
        cpb.DrainRequest(host=host, policy=_policy(), reason="test")
    )
    killed_during = ""
    try:
        for event in stream:
            if event.kind == cpb.DRAIN_EVENT_KIND_MIGRATION_STARTED:
                killed_during = event.vm.name
                coordinator.kill()
                break
    except grpc.RpcError:
        pass
    finally:
        channel.close()
        coordinator.kill()
    assert killed_during, "no migration started before the drain ended"
    print(f"\ncoordinator killed while {killed_during} migrated")

    restarted = site.coordinator("crash")  # the same journal
    restarted.start()
    try:
        deadline = time.monotonic() + 300
        status = _get(restarted.address, host)
        while status.state not in FINISHED_DRAIN_STATES and time.monotonic() < deadline:
            time.sleep(1)
            status = _get(restarted.address, host)
    finally:
        restarted.stop()
    _print_vms(status)
    assert status.state == cpb.DRAIN_STATE_COMPLETED, status
    _assert_emptied(site)

    journal = Journal(make_engine(f"sqlite:///{site.work / 'crash.db'}"), clock=time.time)
    starts = Counter(
        (s.vm_uuid, s.detail.get("attempt"))
        for s in journal.steps(status.drain_id)
        if s.action == "start_migration" and s.state == "done"
    )
    assert starts, "the journal recorded no migration start"
    assert max(starts.values()) == 1, starts
    assert_memory_intact(site.lab, NAMES)


def test_a_target_whose_agent_is_down_gets_no_migration(site: Site) -> None:
    down_host = site.lab.hosts[2]
    coordinator = site.coordinator("agentdown")
    coordinator.start()
    try:
        agent = site.lab.state.process(Role.AGENT, down_host.name)
        assert agent is not None and agent.is_alive()
        assert stop_process(agent, grace_s=5.0)
        events = _drain_events(coordinator.address, site.source.name)
    finally:
        coordinator.stop()
    planned = [e.plan for e in events if e.kind == cpb.DRAIN_EVENT_KIND_PLANNED]
    assert planned, "no plan event"
    assert {m.target_host for m in planned[0].migrations} <= {site.lab.hosts[1].name}
    status = events[-1].status
    _print_vms(status)
    assert status.state == cpb.DRAIN_STATE_COMPLETED, status
    assert all(vm.target_host != down_host.name for vm in status.vms)
    _assert_emptied(site)
    assert all(site.lab.where(g).name == site.lab.hosts[1].name for g in NAMES)
    assert_memory_intact(site.lab, NAMES)
