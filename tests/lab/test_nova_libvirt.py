"""hostmaint beside Nova's own libvirt driver: real nova-compute code moves the lab's guests.

Three lab hosts (libvirt daemons on a shaped link, one hostmaint agent each)
and a real Nova in its own process whose three compute services run
`nova.virt.libvirt.LibvirtDriver`, each connected to the lab host of its name
(lab/nova_libvirt.py says what differs from a deployment, and why). Servers
are booted through Nova's API and spawned by the driver; every live
migration is Nova's `_live_migration_operation` and `_live_migration_monitor`
(its downtime steps, completion timeout, force-complete, abort, post-copy
switch), every cold migration Nova's `migrate_disk_and_power_off` and
`finish_migration`. The coordinator runs as its own process with the `nova`
driver. Nova runs with docs/nova.md's mode 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import libvirt
import pytest

from hostmaint.lab import cluster
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.protos import coordinator_pb2 as cpb
from tests.lab.memcheck import assert_servers_memory_intact
from tests.lab.novasite import (
    LIMIT_MS,
    MIB,
    REASON,
    Site,
    drain,
    lab_up,
    moved_once,
    nova_site,
    print_status,
    running_migration,
    settled,
    undrain,
)

pytestmark = [pytest.mark.lab, pytest.mark.nova]
PREFIX = "hm-nlv"
# One guest that dirties its working set faster than a round takes (several
# rounds, still converging at Nova's first downtime step), one mostly static,
# one that the drain must leave alone.
DIRTY = GuestSpec(f"{PREFIX}-dirty", 256, 48, 24, GuestMode.PACED, 32)
STATIC = GuestSpec(f"{PREFIX}-static", 256, 16, 2, GuestMode.PACED, 96)
BYSTANDER = GuestSpec(f"{PREFIX}-stay", 128, 8, 1, GuestMode.PACED, 8)
# Rewrites a working set faster than the lab link carries it: never converges by itself.
HOT = GuestSpec(f"{PREFIX}-hot", 256, 96, 60, GuestMode.PACED, 0)
POSTCOPY_SWITCH = "Switching to post-copy migration mode"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Lab]:
    yield from lab_up(PREFIX, "10.213.24.0/24", tmp_path_factory.mktemp("nlv"))


@pytest.fixture(scope="module")
def site(lab: cluster.Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    yield from nova_site(lab, tmp_path_factory, [DIRTY, STATIC, BYSTANDER, HOT], "mode1")


def test_drain_through_novas_driver_moves_the_guests_within_the_limit(site: Site) -> None:
    lab, nova = site.lab, site.nova
    source, other = lab.hosts[0].name, lab.hosts[1].name
    dirty, static = nova.boot(DIRTY, source), nova.boot(STATIC, source)
    stay = nova.boot(BYSTANDER, other)
    site.ready(dirty, static, stay)
    coordinator = site.coordinator()
    try:
        t0 = time.monotonic()
        status, events = drain(
            coordinator.address, source, cpb.DrainPolicy(max_downtime_ms=LIMIT_MS)
        )
        print(f"\ndrain of {source} through Nova's libvirt driver: {time.monotonic() - t0:.1f} s")
        print_status(nova, status)
        assert status.state == cpb.DRAIN_STATE_COMPLETED, status
        assert {vm.vm_uuid for vm in status.vms} == {dirty.id, static.id}
        service = nova.get("/os-services", binary="nova-compute", host=source)["services"][0]
        assert (service["status"], service["disabled_reason"]) == ("disabled", REASON)
        for server in (dirty, static):
            target = moved_once(nova, server, source)
            (vm,) = [v for v in status.vms if v.vm_uuid == server.id]
            assert vm.state == cpb.VM_STATE_COMPLETED and vm.target_host == target
            qemu_ms = nova.downtime_ms(server)
            assert qemu_ms is not None and 0 < qemu_ms <= LIMIT_MS, qemu_ms
            assert vm.actual_downtime_ms == pytest.approx(qemu_ms, abs=1)
            # The source agent watched the job Nova's driver started.
            samples = [
                e.progress
                for e in events
                if e.kind == cpb.DRAIN_EVENT_KIND_PROGRESS
                and e.vm_uuid == server.id
                and e.progress.max_downtime_ms > 0
            ]
            assert samples, f"{server.name}: no progress from the agent's watch of the job"
            assert max(p.memory_total_bytes for p in samples) >= 230 * MIB
        # Nova's own monitor ran beside the agents: its first downtime step is in its log.
        assert nova.log_lines("Increasing downtime to 50 ms"), "Nova's monitor did not step"
        # The bystander is untouched.
        assert nova.where(stay) == [other] and nova.live_migrations(stay.id) == []
        assert_servers_memory_intact(nova, [dirty, static, stay])
    finally:
        undrain(coordinator.address, source)
        coordinator.stop()
        for server in (dirty, static, stay):
            nova.delete(server.id)


def test_novas_abort_leaves_the_server_in_error_and_force_complete_switches_to_postcopy(
    site: Site,
) -> None:
    """Nova's abort is the driver's abortJob: the guest stays, running, on its host, but
    Nova 34 marks the server ERROR (its migration thread's "operation aborted" surfaces
    after its monitor rolled back), and refuses to move it until its state is reset.
    Force-complete (post-copy permitted in mode 1) is the monitor's post-copy switch."""
    lab, nova = site.lab, site.nova
    home, away = lab.hosts[2].name, lab.hosts[0].name
    hot = nova.boot(HOT, home)
    site.ready(hot)
    try:
        move = {"os-migrateLive": {"host": away, "block_migration": "auto"}}
        nova.action(hot.id, move)
        record = running_migration(nova, hot)
        resp = nova.http.delete(f"{nova.url}/servers/{hot.id}/migrations/{record['id']}")
        assert resp.status_code == 202, resp.text
        body, status = settled(nova, hot, int(record["id"]), "error")
        assert status == "error" and body["OS-EXT-SRV-ATTR:host"] == home
        assert nova.where(hot) == [home]
        assert nova.post(f"/servers/{hot.id}/action", move).status_code == 409
        nova.action(hot.id, {"os-resetState": {"state": "active"}})

        switches = len(nova.log_lines(POSTCOPY_SWITCH))
        nova.action(hot.id, move)
        record = running_migration(nova, hot, int(record["id"]))
        t0 = time.monotonic()
        resp = nova.post(
            f"/servers/{hot.id}/migrations/{record['id']}/action", {"force_complete": None}
        )
        assert resp.status_code == 202, resp.text
        body, status = settled(nova, hot, int(record["id"]), "active")
        print(
            f"\nhot: force-completed in {time.monotonic() - t0:.1f} s, "
            f"QEMU downtime {nova.downtime_ms(hot)} ms"
        )
        assert status == "completed" and body["OS-EXT-SRV-ATTR:host"] == away
        assert nova.where(hot) == [away]
        assert len(nova.log_lines(POSTCOPY_SWITCH)) == switches + 1
        assert_servers_memory_intact(nova, [hot])
    finally:
        nova.delete(hot.id)


# The coordinator believes the link ten times faster than it is: every migration of the
# hot guest then looks converging in the plan and stalls in fact, so the ladder runs.
def _optimist(site: Site) -> dict[str, str]:
    return {
        "stall_grace_s": "3",
        "stall_factor": "1.0",
        "escalation_settle_s": "3",
        "max_attempts": "2",
        "link_bandwidth_bytes_per_s": str(site.lab.rate_mbit * 1_250_000),
    }


def test_stalled_migration_is_aborted_through_nova_retried_and_left_active(site: Site) -> None:
    """No post-copy: hostmaint raises the limit, then aborts the job through Nova's API.
    Nova marks the server ERROR; once the agents show its guest running on its host (and
    not on the target) hostmaint resets it, starts again, and after max_attempts gives up
    with the server ACTIVE where it was."""
    lab, nova = site.lab, site.nova
    home = lab.hosts[2].name
    hot = nova.boot(HOT, home)
    site.ready(hot)
    coordinator = site.coordinator(**_optimist(site))
    try:
        policy = cpb.DrainPolicy(max_downtime_ms=LIMIT_MS, allow_postcopy=False)
        status, _ = drain(coordinator.address, home, policy)
        print()
        print_status(nova, status)
        (vm,) = status.vms
        assert status.state == cpb.DRAIN_STATE_INCOMPLETE, status
        assert vm.state == cpb.VM_STATE_FAILED and vm.attempts == 2, vm
        assert "abort" in vm.tuning_applied
        records = [m["status"] for m in nova.live_migrations(hot.id)]
        assert records == ["error", "error"], records
        body = nova.server(hot.id)
        assert (body["status"], body["OS-EXT-SRV-ATTR:host"]) == ("ACTIVE", home), body
        assert nova.where(hot) == [home]
        assert_servers_memory_intact(nova, [hot])
    finally:
        undrain(coordinator.address, home)
        coordinator.stop()
        nova.delete(hot.id)


def test_stalled_migration_is_force_completed_into_postcopy_by_novas_monitor(
    site: Site,
) -> None:
    """With post-copy allowed, hostmaint's last resort is Nova's force-complete, which
    Nova's monitor turns into the post-copy switch (mode 1 permits post-copy)."""
    lab, nova = site.lab, site.nova
    home = lab.hosts[2].name
    hot = nova.boot(HOT, home)
    site.ready(hot)
    switches = len(nova.log_lines(POSTCOPY_SWITCH))
    coordinator = site.coordinator(**_optimist(site))
    try:
        policy = cpb.DrainPolicy(max_downtime_ms=LIMIT_MS, allow_postcopy=True)
        status, _ = drain(coordinator.address, home, policy)
        print()
        print_status(nova, status)
        (vm,) = status.vms
        assert status.state == cpb.DRAIN_STATE_COMPLETED, status
        assert vm.target_host == moved_once(nova, hot, home)
        assert len(nova.log_lines(POSTCOPY_SWITCH)) == switches + 1
        assert_servers_memory_intact(nova, [hot])
    finally:
        undrain(coordinator.address, home)
        coordinator.stop()
        nova.delete(hot.id)


def test_stopped_server_is_cold_migrated_by_novas_driver(site: Site) -> None:
    """COLD_MIGRATE: Nova's migrate_disk_and_power_off and finish_migration move the
    stopped server's disk within the shared instances path; it arrives stopped."""
    lab, nova = site.lab, site.nova
    home = lab.hosts[1].name
    # Not the last host whose compute service started: in the one-process Nova that
    # host is CONF.host for every service, and Nova's confirm undefines the source's
    # domain only where the instance's new host differs from CONF.host
    # (lab/nova_libvirt.py, "One process, several hosts").
    target_host = lab.hosts[0].name
    quiet = nova.boot(BYSTANDER, home)
    nova.action(quiet.id, {"os-stop": None})
    nova.wait_server(quiet.id, {"SHUTOFF"}, 60)
    coordinator = site.coordinator()
    try:
        policy = cpb.DrainPolicy(
            max_downtime_ms=LIMIT_MS,
            non_live_action=cpb.NON_LIVE_ACTION_COLD_MIGRATE,
            target_hosts=[target_host],
        )
        status, _ = drain(coordinator.address, home, policy)
        print()
        print_status(nova, status)
        (vm,) = status.vms
        assert vm.state == cpb.VM_STATE_COMPLETED, status
        body = nova.server(quiet.id)
        target = body["OS-EXT-SRV-ATTR:host"]
        assert target == target_host and body["status"] == "SHUTOFF", body
        migrations = nova.get("/os-migrations", instance_uuid=quiet.id)["migrations"]
        assert [(m["migration_type"], m["status"]) for m in migrations] == [
            ("migration", "confirmed")
        ]
        # The domain is defined, shut off, on the target only.
        defined = []
        for host in lab.hosts:
            conn = libvirt.open(host.uri)
            try:
                defined.append((host.name, conn.lookupByName(quiet.instance_name).state()[0]))
            except libvirt.libvirtError:
                pass
            finally:
                conn.close()
        assert defined == [(target, libvirt.VIR_DOMAIN_SHUTOFF)], defined
    finally:
        undrain(coordinator.address, home)
        coordinator.stop()
        nova.delete(quiet.id)
