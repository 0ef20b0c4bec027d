"""What the lab tests beside Nova's own libvirt driver share: a lab, Nova on it, a coordinator.

See `lab/novalab.py` (Nova with its libvirt driver on a lab) and
`lab/nova_libvirt.py` (what differs from a deployment, and why).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import libvirt
import pytest

from hostmaint.lab import cluster
from hostmaint.lab.demo import CoordinatorProcess, coordinator_config
from hostmaint.lab.novalab import ACTIVE_MIGRATION, NovaLab, Server
from hostmaint.protos import agent_pb2_grpc, coordinator_pb2_grpc
from hostmaint.protos import coordinator_pb2 as cpb
from tests.lab.conftest import require_lab
from tests.nova.conftest import ensure_venv
from tests.ports import free_port

LIMIT_MS = 1000
T = 30.0
DRAIN_TIMEOUT_S = 600.0
GUEST_READY_TIMEOUT_S = 600.0
REASON = "maintenance: lab host firmware"
MIB = 1 << 20


def lab_up(prefix: str, subnet: str, state_dir: Path) -> Iterator[cluster.Lab]:
    """Three lab hosts with their agents, no guests (Nova boots them); down at the end."""
    require_lab()
    ensure_venv()
    config = cluster.LabConfig(prefix=prefix, state_dir=state_dir, subnet=subnet)
    lab, report = cluster.Lab.up(3, [], config)
    try:
        print(f"\nlab: accel={report.accel} ({report.accel_reason}) phases={report.phases_s}")
        assert not report.agent_failures, report.agent_failures
        yield lab
    finally:
        lab.down()


def clean(lab: cluster.Lab) -> None:
    """No guest left on any lab host (a Nova that stopped leaves its domains)."""
    for host in lab.hosts:
        conn = libvirt.open(host.uri)
        try:
            for dom in conn.listAllDomains():
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        finally:
            conn.close()


@dataclass
class Site:
    lab: cluster.Lab
    nova: NovaLab
    work: Path

    def coordinator(self, **drain: str) -> CoordinatorProcess:
        """A coordinator process with the `nova` driver over this Nova and the lab's agents."""
        port = free_port()
        conf = self.work / f"coordinator-{port}.conf"
        nova_section = {"endpoint": self.nova.url, "noauth": "true", "timeout_s": "10"}
        conf.write_text(
            coordinator_config(
                self.lab,
                self.work / f"coordinator-{port}.db",
                port,
                max_downtime_ms=LIMIT_MS,
                extra={"driver": {"name": "nova"}, "nova": nova_section, "drain": drain},
            )
        )
        process = CoordinatorProcess(conf, port, self.work / f"coordinator-{port}.log")
        process.start()
        return process

    def ready(self, *servers: Server) -> None:
        t0 = time.monotonic()
        self.nova.wait_ready(list(servers), GUEST_READY_TIMEOUT_S)
        print(f"guests {[s.name for s in servers]} ready in {time.monotonic() - t0:.1f} s")


def drain(
    address: str, host: str, policy: cpb.DrainPolicy
) -> tuple[cpb.DrainStatus, list[cpb.DrainEvent]]:
    """The final status of a Drain call followed to its end, and its events."""
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        request = cpb.DrainRequest(host=host, policy=policy, reason=REASON)
        events = list(stub.Drain(request, timeout=DRAIN_TIMEOUT_S))
    kinds = [cpb.DrainEventKind.Name(e.kind) for e in events]
    assert events and events[-1].kind == cpb.DRAIN_EVENT_KIND_FINISHED, kinds
    return events[-1].status, events


def undrain(address: str, host: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        assert stub.Undrain(cpb.UndrainRequest(host=host), timeout=T).enabled


def print_status(nova: NovaLab, status: cpb.DrainStatus) -> None:
    by_id = {s.id: s for s in nova.servers.values()}
    for vm in status.vms:
        server = by_id.get(vm.vm_uuid)
        qemu = nova.downtime_ms(server) if server else None
        print(
            f"  {vm.name}: {vm.source_host}->{vm.target_host} {cpb.VmState.Name(vm.state)} "
            f"tuning={list(vm.tuning_applied)} pred={vm.predicted_total_s:.1f}s "
            f"actual={vm.actual_total_s:.1f}s downtime={vm.actual_downtime_ms}ms "
            f"(QEMU: {qemu}) attempts={vm.attempts} {vm.error}"
        )


def moved_once(nova: NovaLab, server: Server, source: str) -> str:
    """The server's one live migration completed; its guest runs once, where Nova says."""
    body = nova.server(server.id)
    nova_host = str(body["OS-EXT-SRV-ATTR:host"])
    assert nova_host != source
    assert body["status"] == "ACTIVE" and body["OS-EXT-STS:task_state"] is None, body
    records = [
        (m["status"], m["source_compute"], m["dest_compute"])
        for m in nova.live_migrations(server.id)
    ]
    assert records == [("completed", source, nova_host)], records
    assert nova.where(server) == [nova_host]
    return nova_host


def agent(lab: cluster.Lab, host: str) -> agent_pb2_grpc.HostAgentStub:
    return agent_pb2_grpc.HostAgentStub(grpc.insecure_channel(lab.host(host).agent_address))


def running_migration(nova: NovaLab, server: Server, after: int = 0) -> dict[str, Any]:
    """The server's new live migration once Nova's monitor has written its progress."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for m in nova.live_migrations(server.id):
            if int(m["id"]) <= after:
                continue
            assert m["status"] in (*ACTIVE_MIGRATION, "completed"), m
            if m["status"] == "running":
                record: dict[str, Any] = nova.get(f"/servers/{server.id}/migrations/{m['id']}")
                if record["migration"].get("memory_total_bytes"):
                    result: dict[str, Any] = record["migration"]
                    return result
        time.sleep(0.5)
    raise AssertionError(f"no running live migration of {server.name} with progress in 120 s")


def settled(
    nova: NovaLab, server: Server, migration_id: int, vm_state: str
) -> tuple[dict[str, Any], str]:
    """The server once its task is over and its vm_state is `vm_state`; the migration's
    status then."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        body = nova.server(server.id)
        status = next(
            m["status"] for m in nova.live_migrations(server.id) if int(m["id"]) == migration_id
        )
        if (
            body.get("OS-EXT-STS:task_state") is None
            and body.get("OS-EXT-STS:vm_state") == vm_state
            and status not in ACTIVE_MIGRATION
        ):
            return body, str(status)
        time.sleep(0.5)
    raise AssertionError(
        f"migration {migration_id} of {server.name} did not end with the server {vm_state} "
        f"in 180 s: {body.get('OS-EXT-STS:vm_state')}, migration {status}"
    )


def nova_site(
    lab: cluster.Lab,
    tmp_path_factory: pytest.TempPathFactory,
    specs: list[Any],
    profile: str,
    extra_flags: tuple[str, ...] = (),
) -> Iterator[Site]:
    """Nova with `profile` on the lab for a module; its guests destroyed at the end."""
    work = tmp_path_factory.mktemp(f"nova-{profile}")
    nova = NovaLab.start(lab, work, specs, profile=profile, extra_flags=extra_flags)
    try:
        print(f"\nnova: profile {profile} {' '.join(extra_flags)}, log {nova.log_path}")
        yield Site(lab, nova, work)
    finally:
        nova.stop()
        clean(lab)
