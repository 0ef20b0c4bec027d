"""The CPU verdict on real libvirt: named models, host-passthrough, and a host that lacks a feature.

Three lab hosts. Host 0 runs guests whose CPUs Nova's `cpu_mode = custom` and
`host-passthrough` would give them: a named model at check none, partial and
full, and host-passthrough. Host 1 is host 0's twin. Host 2's libvirt is made
to see a host CPU without SSE (every guest here uses it): libvirt's own view of
what that host offers. A plan may send every guest to host 1 and none to host
2, and the drain moves them all to host 1.

On nested KVM hosts libvirt calls a named model incompatible even with the host
it runs on (QEMU drops what the host lacks); the verdict must not refuse what
libvirt then moves between twins.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import libvirt
import pytest

from hostmaint.lab import cluster
from hostmaint.lab.demo import CoordinatorProcess, coordinator_config, free_port
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.lab.state import wait_until
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc
from tests.lab.conftest import require_lab

pytestmark = pytest.mark.lab
PREFIX = "hm-cpu"
SUBNET = "10.213.22.0/24"
HIDDEN = "sse"  # in every model below and in every x86-64 host CPU
T = 60
EPYC_NONE = f"{PREFIX}-epyc-none"
EPYC_PARTIAL = f"{PREFIX}-epyc-partial"
FULL = f"{PREFIX}-full"
PASSTHROUGH = f"{PREFIX}-passthrough"
CPUS = {
    # The definition of the issue reports, as Nova's cpu_mode=custom hands it over.
    EPYC_NONE: (
        "<cpu mode='custom' match='exact' check='none'><model fallback='allow'>EPYC</model>"
        "<feature policy='disable' name='svm'/></cpu>"
    ),
    EPYC_PARTIAL: (
        "<cpu mode='custom' match='exact' check='partial'><model fallback='allow'>EPYC</model>"
        "<feature policy='disable' name='svm'/></cpu>"
    ),
    # KVM on these machines refuses MSR 0x10a (arch-capabilities) for a passthrough CPU.
    PASSTHROUGH: (
        "<cpu mode='host-passthrough' check='none'>"
        "<feature policy='disable' name='arch-capabilities'/></cpu>"
    ),
}


@dataclass
class Site:
    lab: cluster.Lab
    work: Path
    names: list[str]


def _live_cpu(uri: str, name: str) -> str:
    """A running guest's <cpu> as libvirt completed it: check='full', every feature
    QEMU enabled or dropped named, so it starts at check='full' on this machine."""
    conn = libvirt.open(uri)
    try:
        cpu = ET.fromstring(conn.lookupByName(name).XMLDesc(0)).find("cpu")
    finally:
        conn.close()
    assert cpu is not None and cpu.get("check") == "full", "libvirt did not complete the CPU"
    return ET.tostring(cpu, encoding="unicode")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_lab()
    config = cluster.LabConfig(
        prefix=PREFIX, state_dir=tmp_path_factory.mktemp("cpu"), subnet=SUBNET
    )
    lab, report = cluster.Lab.up(3, [], config)
    print(f"\nlab: accel={report.accel} phases={report.phases_s}")
    try:
        assert not report.agent_failures, report.agent_failures
        if report.accel != "kvm":
            pytest.skip(f"guest CPU models need KVM ({report.accel_reason})")
        source = lab.hosts[0]
        cpus = dict(CPUS)
        for name, cpu in cpus.items():
            lab.add_guest(_spec(name), source.name, cpu_xml=cpu, wait=False)
        # A named model at check='full': the partial guest's definition as libvirt completed it.
        cpus[FULL] = _live_cpu(source.uri, EPYC_PARTIAL)
        lab.add_guest(_spec(FULL), source.name, cpu_xml=cpus[FULL], wait=False)
        lab.wait_guests_ready(120)
        lab.hide_cpu_features(lab.hosts[2].name, [HIDDEN])
        lab.restart_agent(lab.hosts[2].name)
        yield Site(lab, tmp_path_factory.mktemp("cpu-work"), list(cpus))
    finally:
        lab.down()


def _spec(name: str) -> GuestSpec:
    return GuestSpec(name, 128, 8, 1, GuestMode.PACED, 16)


def _coordinator(site: Site, name: str) -> CoordinatorProcess:
    port = free_port()
    conf = site.work / f"{name}.conf"
    conf.write_text(coordinator_config(site.lab, site.work / f"{name}.db", port))
    return CoordinatorProcess(conf, port, site.work / f"{name}.log")


def _plan(address: str, host: str, targets: list[str]) -> cpb.DrainPlan:
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        policy = cpb.DrainPolicy(max_downtime_ms=1000, target_hosts=targets)
        plan: cpb.DrainPlan = stub.PlanDrain(
            cpb.PlanDrainRequest(host=host, policy=policy), timeout=T
        )
        return plan


def test_guests_libvirt_moves_go_to_the_twin_and_none_to_the_host_lacking_a_feature(
    site: Site,
) -> None:
    source, twin, lacking = site.lab.hosts
    coordinator = _coordinator(site, "cpu")
    coordinator.start()
    try:
        only_lacking = _plan(coordinator.address, source.name, [lacking.name])
        plan = _plan(coordinator.address, source.name, [])
        with grpc.insecure_channel(coordinator.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            events = list(
                stub.Drain(
                    cpb.DrainRequest(host=source.name, policy=cpb.DrainPolicy(max_downtime_ms=1000))
                )
            )
    finally:
        coordinator.stop()
    refused = {u.name: u.reason for u in only_lacking.unmovable}
    print(f"\nrefused on {lacking.name}: {refused}")
    print(f"planned: {[(m.name, m.target_host) for m in plan.migrations]}")
    assert sorted(refused) == sorted(site.names)
    assert all(f"lacks {HIDDEN}" in why for why in refused.values()), refused
    assert not plan.unmovable, plan.unmovable
    assert {m.name: m.target_host for m in plan.migrations} == {n: twin.name for n in site.names}
    status = events[-1].status
    assert events[-1].kind == cpb.DRAIN_EVENT_KIND_FINISHED
    assert status.state == cpb.DRAIN_STATE_COMPLETED, status
    for name in site.names:
        assert [h.name for h in site.lab.running_on(name)] == [twin.name]
    # Each guest still runs its loop on the twin.
    before = {n: len(site.lab.guest_events(n)) for n in site.names}
    assert wait_until(
        lambda: all(len(site.lab.guest_events(n)) > before[n] for n in site.names), 10
    )
