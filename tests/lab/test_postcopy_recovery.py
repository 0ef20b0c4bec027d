"""Post-copy recovery on real QEMU: the link cut after the switch, then back, or the target
gone for good.

One guest on a slow link (100 Mbit/s) writes faster than the link carries, so the plan
sends it through post-copy after its first pass; the post-copy then takes several
seconds, and the cut lands inside it. The cut: the target's NIC goes down and both
ends' migration connections are reset (`ss -K`), as a link that fails for long enough
leaves them; without the reset a TCP stream over a dead link only stalls, and QEMU would
notice minutes later. libvirt 9.0 then leaves the guest paused on the source
(PAUSED/POSTCOPY_FAILED) and waiting on the target (RUNNING/POSTCOPY_FAILED). After the
cut the NIC comes back and the coordinator's resumes (VIR_MIGRATE_POSTCOPY_RESUME
through the source agent) get through.

Each run drains the host the guest is on to the other one. Expected for every cut
(1 s to 30 s): the VM resumed, completed, running on the target and only there, no
copy left on the source, nothing aborted. A target whose guest dies during the cut:
the VM reported stranded, with where its halves are, and never as moved.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.lab import cluster, network
from hostmaint.lab.demo import CoordinatorProcess, coordinator_config, free_port
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import agent_pb2_grpc, coordinator_pb2_grpc
from hostmaint.protos import coordinator_pb2 as cpb
from tests.lab.conftest import require_lab
from tests.lab.memcheck import assert_memory_intact

pytestmark = pytest.mark.lab
SUBNET = "10.213.27.0/24"
PREFIX = "hm-pcr"
RATE_MBIT = 100
LIMIT_MS = 300
# 40 MiB/s over a 12 MB/s link: no pre-copy setting converges, post-copy after the first
# pass (about 11 s), then about as long again in post-copy
GUEST = GuestSpec(f"{PREFIX}-writer", 192, 128, 40, GuestMode.PACED, 0)
CUTS_S = [1.0, 3.0, 8.0, 15.0, 30.0]
DRAIN_TIMEOUT_S = 300.0
Ev = cpb.DrainEventKind


@dataclass
class Site:
    lab: cluster.Lab
    work: Path

    def coordinator(self, name: str, deadline_s: float) -> CoordinatorProcess:
        port = free_port()
        conf = self.work / f"{name}.conf"
        recovery = {
            "postcopy_resume_first_s": "1",
            "postcopy_resume_max_s": "4",
            "postcopy_recovery_deadline_s": str(deadline_s),
        }
        conf.write_text(
            coordinator_config(
                self.lab,
                self.work / f"{name}.db",
                port,
                max_downtime_ms=LIMIT_MS,
                extra={"drain": recovery},
            )
        )
        return CoordinatorProcess(conf, port, self.work / f"{name}.log")

    def journal(self, name: str) -> Journal:
        return Journal(make_engine(f"sqlite:///{self.work / f'{name}.db'}"), clock=time.time)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_lab()
    config = cluster.LabConfig(
        prefix=PREFIX,
        state_dir=tmp_path_factory.mktemp("pcr"),
        subnet=SUBNET,
        rate_mbit=RATE_MBIT,
    )
    lab, report = cluster.Lab.up(2, [cluster.GuestPlan(GUEST, 0)], config)
    print(f"\nlab: accel={report.accel} ({report.accel_reason})")
    try:
        assert not report.agent_failures, report.agent_failures
        yield Site(lab, tmp_path_factory.mktemp("pcr-work"))
    finally:
        lab.down()


@dataclass
class Drain:
    """A Drain call read by a thread; `switched` is set at the first post-copy sample."""

    address: str
    host: str
    events: list[cpb.DrainEvent] = field(default_factory=list)
    switched: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._read, name="drain-reader", daemon=True).start()

    def _read(self) -> None:
        policy = cpb.DrainPolicy(max_downtime_ms=LIMIT_MS, allow_postcopy=True)
        try:
            with grpc.insecure_channel(self.address) as channel:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                request = cpb.DrainRequest(host=self.host, policy=policy, reason="test")
                for event in stub.Drain(request, timeout=DRAIN_TIMEOUT_S):
                    self.events.append(event)
                    if event.progress.phase == apb.MIGRATION_PHASE_POSTCOPY:
                        self.switched.set()
        finally:
            self.done.set()

    def final(self) -> cpb.DrainStatus:
        assert self.done.wait(DRAIN_TIMEOUT_S), "the drain did not end"
        assert self.events and self.events[-1].kind == Ev.DRAIN_EVENT_KIND_FINISHED
        return self.events[-1].status

    def at(self, kind: int) -> float | None:
        for e in self.events:
            if e.kind == kind:
                return e.at.seconds + e.at.nanos / 1e9
        return None


def _link(host: cluster.LabHost, up: bool) -> None:
    subprocess.run(
        ["ip", "-n", host.netns, "link", "set", network.HOST_NIC, "up" if up else "down"],
        check=True,
    )
    if up:
        network.shape(host.netns, network.HOST_NIC, RATE_MBIT)


def _reset_streams(source: cluster.LabHost, target: cluster.LabHost) -> None:
    """Both ends' migration connections reset, as a failed link leaves them in the end."""
    address = target.migration_address
    for netns, side in ((source.netns, "dst"), (target.netns, "src")):
        subprocess.run(
            ["ip", "netns", "exec", netns, "ss", "-K", "-t", "state", "established", side, address],
            check=True,
            capture_output=True,
        )


def _defined_on(host: cluster.LabHost, name: str) -> list[str]:
    """The states of the domains called `name` that `host`'s agent lists."""
    with grpc.insecure_channel(host.agent_address) as channel:
        stub = agent_pb2_grpc.HostAgentStub(channel)
        domains = stub.ListDomains(apb.ListDomainsRequest(), timeout=20).domains
    return [apb.DomainState.Name(d.state) for d in domains if d.name == name]


def _hosts(site: Site) -> tuple[cluster.LabHost, cluster.LabHost]:
    source = site.lab.where(GUEST.name)
    target = next(h for h in site.lab.hosts if h.name != source.name)
    return source, target


ROWS: list[str] = []


@pytest.mark.parametrize("cut_s", CUTS_S)
def test_a_link_cut_during_postcopy_is_resumed_and_the_vm_moves(site: Site, cut_s: float) -> None:
    source, target = _hosts(site)
    name = f"cut{cut_s:g}"
    coordinator = site.coordinator(name, deadline_s=180.0)
    coordinator.start()
    drain = Drain(coordinator.address, source.name)
    cut_at = 0.0
    try:
        drain.start()
        assert drain.switched.wait(120), "the guest never switched to post-copy"
        _link(target, up=False)
        _reset_streams(source, target)
        cut_at = time.time()
        print(f"\ncut {cut_s:g}s: {target.name}'s link down during post-copy from {source.name}")
        threading.Event().wait(cut_s)  # the fault's length, not a synchronisation
        _link(target, up=True)
        status = drain.final()
    finally:
        _link(target, up=True)
        coordinator.stop()
    (vm,) = status.vms
    paused, resumed = (
        drain.at(Ev.DRAIN_EVENT_KIND_POSTCOPY_PAUSED),
        drain.at(Ev.DRAIN_EVENT_KIND_POSTCOPY_RESUMED),
    )
    steps = site.journal(name).steps(status.drain_id)
    tries = sum(1 for s in steps if s.action == "resume_postcopy")
    running = [h.name for h in site.lab.running_on(GUEST.name)]
    ROWS.append(
        f"cut {cut_s:5.1f}s  paused {'-' if paused is None else f'{paused - cut_at:+.1f}s'}  "
        f"resumed {'-' if resumed is None else f'{resumed - cut_at:+.1f}s'}  tries {tries}  "
        f"vm {cpb.VmState.Name(vm.state)} in {vm.actual_total_s:.1f}s  running on {running}"
    )
    print("\n" + "\n".join(ROWS))
    assert paused is not None and resumed is not None and paused < resumed, drain.events
    assert (status.state, vm.state) == (cpb.DRAIN_STATE_COMPLETED, cpb.VM_STATE_COMPLETED)
    assert running == [target.name]  # not lost, not twice
    assert _defined_on(source, GUEST.name) == []  # no paused half left behind
    assert not [s for s in steps if s.action == "abort"]
    assert tries >= 1
    assert_memory_intact(site.lab, [GUEST.name])  # every page as the guest wrote it


def test_a_target_gone_for_good_is_reported_stranded(site: Site) -> None:
    source, target = _hosts(site)
    coordinator = site.coordinator("gone", deadline_s=30.0)
    coordinator.start()
    drain = Drain(coordinator.address, source.name)
    try:
        drain.start()
        assert drain.switched.wait(120), "the guest never switched to post-copy"
        _link(target, up=False)
        _reset_streams(source, target)
        assert site.lab.kill_qemu(target.name, GUEST.name) is not None
        status = drain.final()
    finally:
        _link(target, up=True)
        coordinator.stop()
    (vm,) = status.vms
    stranded = [e for e in drain.events if e.kind == Ev.DRAIN_EVENT_KIND_STRANDED]
    print(f"\ntarget gone: {cpb.VmState.Name(vm.state)}: {vm.error}")
    print(f"left on {source.name}: {_defined_on(source, GUEST.name)}")
    assert (status.state, vm.state) == (cpb.DRAIN_STATE_INCOMPLETE, cpb.VM_STATE_STRANDED)
    assert (status.summary.migrated, status.summary.stranded) == (0, 1)
    assert len(stranded) == 1 and stranded[0].message == vm.error
    assert f"its copy on {target.name} is gone" in vm.error and source.name in vm.error
    assert not [e for e in drain.events if e.kind == Ev.DRAIN_EVENT_KIND_MIGRATION_COMPLETED]
    # what is left: the paused half on the source, nothing on the target
    assert _defined_on(source, GUEST.name) == ["DOMAIN_STATE_PAUSED"]
    assert [h.name for h in site.lab.running_on(GUEST.name)] == []
    steps = site.journal("gone").steps(status.drain_id)
    (last,) = [s for s in steps if s.action == "stranded"]
    assert last.detail == {"source": source.name, "target": target.name}
