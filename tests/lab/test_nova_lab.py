"""The whole path at once: a drain through the real Nova moves real KVM guests of the lab.

Three lab hosts (libvirt daemons on a shaped link, one hostmaint agent each);
a real Nova in its own process whose three compute services bear the lab
hosts' names and run the lab driver (lab/nova_labdriver.py): its live
migrations are real libvirt migrations between the lab hosts. Each Nova
server has a lab guest of its own, booted on the server's host with the
server's id as domain uuid and Nova's metadata, so the coordinator's `nova`
driver and the agents see one VM. The coordinator runs as its own process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import libvirt
import pytest

from hostmaint.lab import cluster
from hostmaint.lab.demo import (
    CoordinatorProcess,
    coordinator_config,
    free_port,
    last_downtime_ms,
    placement,
)
from hostmaint.lab.domains import NovaMetadata
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc
from tests.lab.conftest import require_lab
from tests.nova.conftest import NOVA_VENV, REPO, NovaAdmin, NovaProcess, _ensure_venv

pytestmark = [pytest.mark.lab, pytest.mark.nova]
PREFIX = "hm-nlb"
SUBNET = "10.213.24.0/24"
LIMIT_MS = 1000
T = 30.0
NOVA_START_TIMEOUT_S = 180.0
DRAIN_TIMEOUT_S = 600.0
# Guests boot slowly on a loaded 2-core machine.
GUEST_READY_TIMEOUT_S = 900.0
REASON = "maintenance: lab host firmware"
# On the drained host: one guest that dirties its working set faster than a
# round takes (several rounds, still converging at QEMU's default limit) and
# one mostly static; on a second host, one that the drain must leave alone.
DIRTY = GuestSpec(f"{PREFIX}-dirty", 256, 48, 24, GuestMode.PACED, 32)
STATIC = GuestSpec(f"{PREFIX}-static", 256, 16, 2, GuestMode.PACED, 96)
BYSTANDER = GuestSpec(f"{PREFIX}-stay", 128, 8, 1, GuestMode.PACED, 8)


@dataclass
class Site:
    lab: cluster.Lab
    nova: NovaProcess
    admin: NovaAdmin
    work: Path
    # guest name -> Nova server id (= the lab domain's uuid)
    servers: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> cluster.LabHost:
        return self.lab.hosts[0]


def _libvirt_python_dir(work: Path) -> Path:
    """The project's libvirt bindings, linked into a folder of their own for Nova's venv."""
    src = Path(libvirt.__file__).resolve().parent
    folder = work / "libvirt-python"
    folder.mkdir()
    for item in src.iterdir():
        if item.name == "libvirt.py" or item.name.startswith("libvirtmod."):
            (folder / item.name).symlink_to(item)
    return folder


def _start_nova(lab: cluster.Lab, work: Path) -> tuple[subprocess.Popen[bytes], NovaProcess]:
    config = work / "lab-hosts.json"
    config.write_text(
        json.dumps(
            {
                "hosts": {
                    h.name: {"uri": h.uri, "migration_uri": f"tcp://{h.migration_address}"}
                    for h in lab.hosts
                },
                "libvirt_python_dir": str(_libvirt_python_dir(work)),
            }
        )
    )
    ready = work / "nova-ready.json"
    log_path = work / "nova.log"
    stderr_path = work / "nova.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    started = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [
                str(NOVA_VENV / "bin" / "python"),
                str(REPO / "lab" / "nova_server.py"),
                *("--port", "0", "--ready-file", str(ready), "--log-file", str(log_path)),
                *("--driver", "lab", "--lab-config", str(config)),
                *(h.name for h in lab.hosts),
            ],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    while not ready.exists():
        if proc.poll() is not None:
            tail = stderr_path.read_text(errors="replace").strip().splitlines()[-15:]
            pytest.fail("Nova exited before it was ready:\n" + "\n".join(tail))
        if time.monotonic() - started > NOVA_START_TIMEOUT_S:
            _stop_nova(proc)
            pytest.fail(f"Nova not ready in {NOVA_START_TIMEOUT_S} s (log: {log_path})")
        time.sleep(0.2)
    info = json.loads(ready.read_text())
    nova = NovaProcess(
        url=f"http://127.0.0.1:{info['port']}/v2.1",
        port=int(info["port"]),
        pid=proc.pid,
        hosts=tuple(info["hosts"]),
        image_id=info["image_id"],
        flavors=tuple(info["flavors"]),
        startup_s=time.monotonic() - started,
        rss_bytes=int(info["rss_bytes"]),
        log_path=log_path,
    )
    print(f"\nnova: driver={info['driver']} startup_s={nova.startup_s:.1f} log={log_path}")
    return proc, nova


def _stop_nova(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=T)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _flavor(admin: NovaAdmin, memory_mib: int) -> tuple[str, str]:
    """A flavor of the guest's size: (id, name)."""
    name = f"{PREFIX}-{memory_mib}"
    body: dict[str, Any] = {"flavor": {"name": name, "ram": memory_mib, "vcpus": 1, "disk": 1}}
    resp = admin.http.post(f"{admin.nova.url}/flavors", json=body)
    if resp.status_code == 409:  # made by an earlier server of this size
        for f in admin.nova.flavors:
            if f["name"] == name:
                return str(f["id"]), name
        listed = admin.http.get(f"{admin.nova.url}/flavors").json()["flavors"]
        return next(str(f["id"]) for f in listed if f["name"] == name), name
    resp.raise_for_status()
    return str(resp.json()["flavor"]["id"]), name


def _server_with_guest(
    site: Site, spec: GuestSpec, host: cluster.LabHost, wait: bool = True
) -> str:
    """A Nova server on `host` and its lab guest: same uuid, Nova's metadata in the XML."""
    flavor_id, flavor_name = _flavor(site.admin, spec.memory_mib)
    server_id = site.admin.create_server(host.name, flavor=flavor_id, name=spec.name)
    server = site.admin.server(server_id)
    assert server["OS-EXT-SRV-ATTR:host"] == host.name
    meta = NovaMetadata(spec.name, flavor_name, server["tenant_id"], server["user_id"])
    site.lab.add_guest(
        spec,
        host.name,
        uuid=server_id,
        nova=meta,
        wait=wait,
        ready_timeout_s=GUEST_READY_TIMEOUT_S,
    )
    site.servers[spec.name] = server_id
    return server_id


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_lab()
    _ensure_venv()
    work = tmp_path_factory.mktemp("nlb-work")
    config = cluster.LabConfig(
        prefix=PREFIX, state_dir=tmp_path_factory.mktemp("nlb"), subnet=SUBNET
    )
    lab, report = cluster.Lab.up(3, [], config)
    proc: subprocess.Popen[bytes] | None = None
    try:
        print(f"\nlab: accel={report.accel} ({report.accel_reason}) phases={report.phases_s}")
        assert not report.agent_failures, report.agent_failures
        proc, nova = _start_nova(lab, work)
        admin = NovaAdmin(nova)
        site = Site(lab, nova, admin, work)
        t0 = time.monotonic()
        for spec, host in (
            (DIRTY, lab.hosts[0]),
            (STATIC, lab.hosts[0]),
            (BYSTANDER, lab.hosts[1]),
        ):
            _server_with_guest(site, spec, host, wait=False)
        try:
            lab.wait_guests_ready(GUEST_READY_TIMEOUT_S)
        except Exception:
            for name in lab.guest_names:
                print(f"serial of {name}: {lab.guest_serial(name)[-500:]!r}")
            raise
        print(f"servers and their guests ready in {time.monotonic() - t0:.1f} s")
        try:
            yield site
        finally:
            admin.http.close()
    finally:
        if proc is not None:
            _stop_nova(proc)
        lab.down()


def _drain(address: str, host: str) -> list[cpb.DrainEvent]:
    policy = cpb.DrainPolicy(max_downtime_ms=LIMIT_MS)
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        request = cpb.DrainRequest(host=host, policy=policy, reason=REASON)
        return list(stub.Drain(request, timeout=DRAIN_TIMEOUT_S))


def _undrain(address: str, host: str) -> cpb.UndrainResponse:
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        answer: cpb.UndrainResponse = stub.Undrain(cpb.UndrainRequest(host=host), timeout=T)
        return answer


def _service(site: Site, host: str) -> dict[str, Any]:
    resp = site.admin.http.get(
        f"{site.nova.url}/os-services", params={"binary": "nova-compute", "host": host}
    )
    resp.raise_for_status()
    (service,) = resp.json()["services"]
    result: dict[str, Any] = service
    return result


def _live_migrations(site: Site, server_id: str) -> list[dict[str, Any]]:
    return [m for m in site.admin.migrations(server_id) if m["migration_type"] == "live-migration"]


def _agent_samples(events: list[cpb.DrainEvent], vm_uuid: str) -> list[cpb.DrainEvent]:
    """Progress from the source agent's watch of the QEMU job (the cloud's record has no
    QEMU downtime limit or bandwidth: those come only from libvirt's job stats)."""
    return [
        e
        for e in events
        if e.kind == cpb.DRAIN_EVENT_KIND_PROGRESS
        and e.vm_uuid == vm_uuid
        and e.progress.max_downtime_ms > 0
        and e.progress.bandwidth_bytes_per_s > 0
    ]


def test_drain_through_nova_moves_the_real_guests(site: Site) -> None:
    lab, source = site.lab, site.source
    drained = {DIRTY.name, STATIC.name}
    port = free_port()
    conf = site.work / "coordinator.conf"
    nova_section = {"endpoint": site.nova.url, "noauth": "true", "timeout_s": "10"}
    conf.write_text(
        coordinator_config(
            lab,
            site.work / "coordinator.db",
            port,
            max_downtime_ms=LIMIT_MS,
            extra={"driver": {"name": "nova"}, "nova": nova_section},
        )
    )
    coordinator = CoordinatorProcess(conf, port, site.work / "coordinator.log")
    coordinator.start()
    try:
        t0 = time.monotonic()
        events = _drain(coordinator.address, source.name)
        drain_s = time.monotonic() - t0
        kinds = [cpb.DrainEventKind.Name(e.kind) for e in events]
        assert events and events[-1].kind == cpb.DRAIN_EVENT_KIND_FINISHED, kinds
        status = events[-1].status
        print(f"\ndrain of {source.name} through Nova: {drain_s:.1f} s, events {len(events)}")
        for vm in status.vms:
            print(
                f"  {vm.name}: {vm.source_host}->{vm.target_host} tuning={vm.tuning} "
                f"applied={list(vm.tuning_applied)} pred={vm.predicted_total_s:.1f}s "
                f"actual={vm.actual_total_s:.1f}s downtime={vm.actual_downtime_ms}ms "
                f"(QEMU: {last_downtime_ms(lab, vm.name)}) attempts={vm.attempts} {vm.error}"
            )
        assert status.state == cpb.DRAIN_STATE_COMPLETED, status
        assert {vm.vm_uuid for vm in status.vms} == {site.servers[n] for n in drained}
        assert status.summary.migrated == len(drained)
        assert 0 < status.summary.max_downtime_ms <= LIMIT_MS
        assert kinds[:2] == ["DRAIN_EVENT_KIND_STARTED", "DRAIN_EVENT_KIND_HOST_DISABLED"]

        service = _service(site, source.name)
        assert (service["status"], service["disabled_reason"]) == ("disabled", REASON)

        where = placement(lab, sorted(site.servers))
        print(f"  placement: {where}")
        for name in drained:
            server_id = site.servers[name]
            server = site.admin.server(server_id)
            nova_host = server["OS-EXT-SRV-ATTR:host"]
            # Nova moved it, and the real guest runs exactly once, where Nova says.
            assert nova_host != source.name, (name, nova_host)
            assert where[name] == [nova_host], (name, where[name], nova_host)
            assert server["status"] == "ACTIVE"
            assert server["OS-EXT-STS:task_state"] is None
            records = _live_migrations(site, server_id)
            print(
                "  "
                + name
                + ": nova records "
                + str([(m["status"], m["source_compute"], m["dest_compute"]) for m in records])
            )
            assert [(m["status"], m["source_compute"], m["dest_compute"]) for m in records] == [
                ("completed", source.name, nova_host)
            ]
            (vm,) = [v for v in status.vms if v.vm_uuid == server_id]
            assert vm.state == cpb.VM_STATE_COMPLETED
            assert vm.target_host == nova_host
            assert 0 < vm.actual_downtime_ms <= LIMIT_MS

            # The source agent watched the real QEMU job: memory moving, rounds counted.
            samples = _agent_samples(events, server_id)
            assert samples, f"{name}: no progress from the agent's watch of the job"
            total = max(s.progress.memory_total_bytes for s in samples)
            processed = max(s.progress.memory_processed_bytes for s in samples)
            rounds = max(s.progress.iteration for s in samples)
            print(
                f"  {name}: agent samples {len(samples)} memory_total={total} "
                f"processed_max={processed} rounds_max={rounds} "
                f"max_downtime_ms={samples[-1].progress.max_downtime_ms}"
            )
            assert total >= (256 << 20) * 9 // 10
            assert processed > 0
        dirty_rounds = max(
            p.progress.iteration for p in _agent_samples(events, site.servers[DIRTY.name])
        )
        assert dirty_rounds >= 2, "the dirty guest should need more than one round"

        # The bystander is untouched, in Nova and in the lab.
        stay = site.admin.server(site.servers[BYSTANDER.name])
        assert stay["OS-EXT-SRV-ATTR:host"] == lab.hosts[1].name
        assert where[BYSTANDER.name] == [lab.hosts[1].name]
        assert _live_migrations(site, site.servers[BYSTANDER.name]) == []

        answer = _undrain(coordinator.address, source.name)
        assert answer.enabled
        assert _service(site, source.name)["status"] == "enabled"
    finally:
        coordinator.stop()


# Rewrites a working set faster than the lab link carries it: never converges by itself.
HOT = GuestSpec(f"{PREFIX}-hot", 256, 96, 60, GuestMode.PACED, 0)
ACTIVE = ("accepted", "queued", "pre-migrating", "preparing", "running")


def _enable_all(site: Site) -> None:
    resp = site.admin.http.get(f"{site.nova.url}/os-services", params={"binary": "nova-compute"})
    resp.raise_for_status()
    for s in resp.json()["services"]:
        if s["status"] != "enabled":
            site.admin.http.put(
                f"{site.nova.url}/os-services/{s['id']}", json={"status": "enabled"}
            ).raise_for_status()


def _running_migration(site: Site, server_id: str, after: int) -> dict[str, Any]:
    """The new live migration of the server once the lab driver reports its memory counters."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for m in _live_migrations(site, server_id):
            if int(m["id"]) <= after:
                continue
            assert m["status"] in (*ACTIVE, "completed"), m
            if m["status"] == "running":
                resp = site.admin.http.get(
                    f"{site.nova.url}/servers/{server_id}/migrations/{m['id']}"
                )
                if resp.status_code == 200:
                    record: dict[str, Any] = resp.json()["migration"]
                    if record.get("memory_total_bytes"):
                        return record
        time.sleep(0.5)
    raise AssertionError(f"no running live migration of {server_id} with progress in 120 s")


def _settled(site: Site, server_id: str, migration_id: int) -> tuple[dict[str, Any], str]:
    """The server once its task is over, and the migration's final status."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        server = site.admin.server(server_id)
        status = next(
            m["status"] for m in _live_migrations(site, server_id) if int(m["id"]) == migration_id
        )
        if server.get("OS-EXT-STS:task_state") is None and status not in ACTIVE:
            return server, str(status)
        time.sleep(0.5)
    raise AssertionError(f"the migration {migration_id} of {server_id} did not end in 180 s")


def _last_id(site: Site, server_id: str) -> int:
    return max((int(m["id"]) for m in _live_migrations(site, server_id)), default=0)


def test_abort_and_force_complete_act_on_the_real_job(site: Site) -> None:
    """Nova's abort is abortJob on the QEMU job; its force-complete (no post-copy) pauses
    the guest until the copy ends, and the guest runs again where it lands."""
    lab = site.lab
    home, away = lab.hosts[2], lab.hosts[0]
    _enable_all(site)
    server_id = _server_with_guest(site, HOT, home)
    try:
        move = {"os-migrateLive": {"host": away.name, "block_migration": "auto"}}
        site.admin.action(server_id, move)
        record = _running_migration(site, server_id, 0)
        print(
            f"\nhot: running, nova record memory_total={record['memory_total_bytes']} "
            f"remaining={record['memory_remaining_bytes']}"
        )
        resp = site.admin.http.delete(
            f"{site.nova.url}/servers/{server_id}/migrations/{record['id']}"
        )
        assert resp.status_code == 202, resp.text
        server, status = _settled(site, server_id, int(record["id"]))
        assert status == "cancelled"
        assert server["OS-EXT-SRV-ATTR:host"] == home.name
        assert server["status"] == "ACTIVE"
        assert placement(lab, [HOT.name])[HOT.name] == [home.name]

        site.admin.action(server_id, move)
        record = _running_migration(site, server_id, int(record["id"]))
        t0 = time.monotonic()
        resp = site.admin.http.post(
            f"{site.nova.url}/servers/{server_id}/migrations/{record['id']}/action",
            json={"force_complete": None},
        )
        assert resp.status_code == 202, resp.text
        server, status = _settled(site, server_id, int(record["id"]))
        print(
            f"hot: force-completed in {time.monotonic() - t0:.1f} s, "
            f"QEMU downtime {last_downtime_ms(lab, HOT.name)} ms"
        )
        assert status == "completed"
        assert server["OS-EXT-SRV-ATTR:host"] == away.name
        assert server["status"] == "ACTIVE"
        # Running (not left paused), exactly once.
        assert placement(lab, [HOT.name])[HOT.name] == [away.name]
    finally:
        _destroy_guest(lab, HOT.name)
        site.admin.delete_server(server_id)


def _destroy_guest(lab: cluster.Lab, name: str) -> None:
    """Stops a guest wherever it is (its QEMU costs CPU the other lab tests need)."""
    for host in lab.hosts:
        conn = libvirt.open(host.uri)
        try:
            conn.lookupByName(name).destroy()
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
