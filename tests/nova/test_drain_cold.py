"""VMs that cannot move live (shut off, paused) in a drain: reported, or cold-migrated.

Through the real Nova with the coordinator's `nova` driver (the lab of
drainlab.py), and once with the libvirt driver, which cannot cold-migrate.
Outcomes are read back from Nova's API: each server's host, status and power
state, and its migration records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostmaint.coordinator import cli
from hostmaint.lab.faultproxy import Fault, FaultProxy
from hostmaint.protos import coordinator_pb2 as cpb
from tests.agent.conftest import FROZEN, STOPPED
from tests.coordinator.conftest import Cluster, cluster  # noqa: F401 - the libvirt fixture

from .conftest import NovaAdmin, NovaProcess
from .drainlab import DrainLab, T, lab_fixture, purge, wait_until

ACTION = r"^/v2\.1/servers/{}/action$"
COLD = cpb.NON_LIVE_ACTION_COLD_MIGRATE
# Nova's power_state values in OS-EXT-STS:power_state.
SHUTDOWN = 4


@pytest.fixture(scope="module")
def clean_nova(nova: NovaProcess) -> None:
    admin = NovaAdmin(nova)
    try:
        purge(admin)
    finally:
        admin.http.close()


@pytest.fixture
def lab(clean_nova: None, nova_admin: NovaAdmin, tmp_path: Path) -> Iterator[DrainLab]:
    yield from lab_fixture(nova_admin, tmp_path)


def _server_in(lab: DrainLab, action: str, status: str) -> str:
    """A server on host1, brought to `status` by a server action (os-stop, pause)."""
    server_id = lab.server()
    lab.admin.action(server_id, {action: None})
    lab.admin.wait_server(server_id, {status})
    return server_id


def _cold_migrations(lab: DrainLab, server_id: str) -> list[dict[str, Any]]:
    return [m for m in lab.admin.migrations(server_id) if m["migration_type"] == "migration"]


def _state(lab: DrainLab, server_id: str) -> tuple[str, str, int, str | None]:
    s = lab.admin.server(server_id)
    return (
        s["OS-EXT-SRV-ATTR:host"],
        s["status"],
        s["OS-EXT-STS:power_state"],
        s["OS-EXT-STS:task_state"],
    )


def _cli(lab: DrainLab, *args: str) -> int:
    assert lab.coordinator is not None
    return cli.main([*args, "--coordinator", f"127.0.0.1:{lab.coordinator.port}"])


def test_cold_migrate_moves_a_stopped_server_after_the_live_ones_and_keeps_it_off(
    lab: DrainLab, capsys: pytest.CaptureFixture[str]
) -> None:
    stopped = _server_in(lab, "os-stop", "SHUTOFF")
    live = lab.server(migration_s=0.5)
    lab.start()
    assert lab.stub is not None

    # The plan says what will become of it.
    assert _cli(lab, "plan", "host1", "--cold-migrate-stopped", "--json") == cli.EXIT_OK
    plan = json.loads(capsys.readouterr().out)
    assert [m["vm_uuid"] for m in plan["migrations"]] == [live]
    assert plan["unmovable"] == []  # nothing stays behind
    (cold,) = plan["cold_migrations"]
    assert cold["vm_uuid"] == stopped
    assert "shutoff: to be cold-migrated to a host of the scheduler's choice" in cold["reason"]

    code = _cli(lab, "drain", "host1", "--cold-migrate-stopped", "--progress", "lines")
    assert code == cli.EXIT_OK, capsys.readouterr()
    status = lab.stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T)
    assert status.state == cpb.DRAIN_STATE_COMPLETED, status
    assert status.policy.non_live_action == COLD  # what the flag sent

    host, server_status, power, task = _state(lab, stopped)
    assert host in ("host2", "host3")
    # Nova keeps the power state across a cold migration: still off, nothing pending.
    assert (server_status, power, task) == ("SHUTOFF", SHUTDOWN, None)
    (record,) = _cold_migrations(lab, stopped)
    assert (record["status"], record["source_compute"], record["dest_compute"]) == (
        "confirmed",
        "host1",
        host,
    )
    assert lab.admin.server(live)["OS-EXT-SRV-ATTR:host"] in ("host2", "host3")

    vms = {v.vm_uuid: v for v in status.vms}
    cold = vms[stopped]
    assert cold.state == cpb.VM_STATE_COMPLETED
    assert (cold.target_host, cold.attempts, cold.actual_downtime_ms) == (host, 1, 0)
    assert cold.actual_total_s > 0
    assert vms[live].state == cpb.VM_STATE_COMPLETED
    assert status.summary.migrated == 2

    steps = lab.steps(status.drain_id)
    starts = [s for s in steps if s.vm_uuid == stopped]
    assert [(s.action, s.state) for s in starts] == [
        ("cold_migrate", "done"),
        ("confirm_migration", "done"),
    ]
    assert starts[0].detail["target"] == ""  # the scheduler chose
    # One at a time, after the live migrations: started once the live one had ended.
    (live_start,) = [s for s in steps if s.action == "start_migration"]
    assert live_start.id < starts[0].id
    assert lab.coordinator is not None
    rows = {r.vm_uuid: r for r in lab.coordinator.journal.vms(status.drain_id)}
    assert rows[live].finished_at is not None and rows[stopped].started_at is not None
    assert rows[live].finished_at <= rows[stopped].started_at


def test_report_leaves_a_stopped_server_in_place_and_the_drain_incomplete(
    lab: DrainLab,
) -> None:
    stopped = _server_in(lab, "os-stop", "SHUTOFF")
    lab.start()
    finished = lab.drain(non_live_action=cpb.NON_LIVE_ACTION_REPORT).finished()
    assert finished.status.state == cpb.DRAIN_STATE_INCOMPLETE, finished.status
    (vm,) = finished.status.vms
    assert vm.state == cpb.VM_STATE_UNMOVABLE
    assert vm.error == "the VM is shutoff: not live-migratable; left in place (policy: report)"
    assert _state(lab, stopped) == ("host1", "SHUTOFF", SHUTDOWN, None)
    assert lab.admin.migrations(stopped) == []
    assert lab.steps(finished.drain_id, "cold_migrate") == []


def test_cold_migration_refused_by_nova_fails_with_the_reason_and_changes_nothing(
    lab: DrainLab, fault_proxy: FaultProxy
) -> None:
    # Nova cold-migrates only active or stopped servers: a paused one gets its 409.
    paused = _server_in(lab, "pause", "PAUSED")
    # And a stopped one whose migrate action the proxy answers with a 400.
    stopped = _server_in(lab, "os-stop", "SHUTOFF")
    refused = fault_proxy.add(
        Fault(method="POST", path=ACTION.format(stopped), status=400, times=None)
    )
    before = {s: lab.admin.server(s) for s in (paused, stopped)}
    lab.start(endpoint=f"{fault_proxy.url}/v2.1")
    stream = lab.drain(non_live_action=COLD)
    finished = stream.finished()
    assert finished.status.state == cpb.DRAIN_STATE_INCOMPLETE, finished.status
    vms = {v.vm_uuid: v for v in finished.status.vms}

    assert vms[paused].state == cpb.VM_STATE_FAILED
    assert "409" in vms[paused].error and "paused" in vms[paused].error
    assert vms[stopped].state == cpb.VM_STATE_FAILED
    assert "400" in vms[stopped].error and "injected by faultproxy" in vms[stopped].error
    assert refused.matched == 1
    for server_id in (paused, stopped):
        assert vms[server_id].attempts == 1
        assert stream.kinds(server_id)[-1] == "MIGRATION_FAILED"
        # One request each, never repeated; nothing moved, nothing else changed.
        assert len(fault_proxy.seen("POST", ACTION.format(server_id))) == 1
        assert lab.admin.migrations(server_id) == []
        after = lab.admin.server(server_id)
        for key in ("OS-EXT-SRV-ATTR:host", "status", "OS-EXT-STS:power_state", "updated"):
            assert after[key] == before[server_id][key], key
    steps = lab.steps(finished.drain_id, "cold_migrate")
    assert sorted(s.state for s in steps) == ["failed", "failed"]
    assert lab.steps(finished.drain_id, "confirm_migration") == []
    assert lab.service("host1")["status"] == "disabled"


def test_server_started_since_the_plan_is_not_cold_migrated(lab: DrainLab) -> None:
    stopped = _server_in(lab, "os-stop", "SHUTOFF")
    live = lab.server(migration_s=4)
    lab.start()
    stream = lab.drain(non_live_action=COLD)
    stream.wait_for(lambda e: e.kind == cpb.DRAIN_EVENT_KIND_MIGRATION_STARTED)
    # While the live migration runs, someone starts the stopped server.
    lab.admin.action(stopped, {"os-start": None})
    lab.admin.wait_server(stopped, {"ACTIVE"})
    finished = stream.finished()
    assert finished.status.state == cpb.DRAIN_STATE_INCOMPLETE, finished.status
    vms = {v.vm_uuid: v for v in finished.status.vms}
    assert vms[live].state == cpb.VM_STATE_COMPLETED
    assert vms[stopped].state == cpb.VM_STATE_FAILED
    assert vms[stopped].error == "the VM is active now: not cold-migrated (that would stop it)"
    assert _state(lab, stopped)[:2] == ("host1", "ACTIVE")
    assert lab.admin.migrations(stopped) == []
    assert lab.steps(finished.drain_id, "cold_migrate") == []


@pytest.mark.parametrize(
    ("in_flight", "start_result", "confirm_results"),
    [
        # Killed while Nova receives the migrate action: the open intent is
        # reconciled with Nova's record, then the one migration is confirmed.
        ("migrate", "started before the restart", ["confirmed"]),
        # Killed while Nova receives the confirmation: it is not sent again.
        ("confirm", None, ["confirmed before the restart (confirmed)"]),
    ],
)
def test_coordinator_killed_during_a_cold_migration_resumes_without_repeating_it(
    lab: DrainLab,
    fault_proxy: FaultProxy,
    in_flight: str,
    start_result: str | None,
    confirm_results: list[str],
) -> None:
    stopped = _server_in(lab, "os-stop", "SHUTOFF")
    endpoint = f"{fault_proxy.url}/v2.1"
    # The server's first (migrate) or second (confirm) action is held by the
    # proxy, then reaches Nova anyway.
    skip = 0 if in_flight == "migrate" else 1
    held = fault_proxy.add(
        Fault(method="POST", path=ACTION.format(stopped), delay_s=2.0, skip=skip, times=1)
    )
    lab.start_agents(("host1", "host2", "host3"))
    proc = lab.spawn_coordinator(endpoint)
    stream = lab.drain(non_live_action=COLD)
    wait_until(lambda: held.matched == 1, T, f"the {in_flight} request is in flight")
    proc.kill()
    proc.wait(T)
    stream.cancel()
    posts = skip + 1
    wait_until(
        lambda: len(fault_proxy.seen("POST", ACTION.format(stopped))) == posts, T, "forwarded"
    )
    # Nova accepted each (migrate answers 202, confirmResize 204).
    assert [(p.status, p.forwarded) for p in fault_proxy.seen("POST")] == [
        (202, True),
        (204, True),
    ][:posts]

    lab.start_coordinator(endpoint)
    stub = lab.stub
    assert stub is not None
    wait_until(
        lambda: stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T).state
        == cpb.DRAIN_STATE_COMPLETED,
        90.0,
        "the resumed drain completes",
    )
    status = stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T)
    (vm,) = status.vms
    assert (vm.state, vm.attempts) == (cpb.VM_STATE_COMPLETED, 1)
    (record,) = _cold_migrations(lab, stopped)
    assert record["status"] == "confirmed"
    host, server_status, power, task = _state(lab, stopped)
    assert host == record["dest_compute"] != "host1"
    assert (server_status, power, task) == ("SHUTOFF", SHUTDOWN, None)
    (start,) = lab.steps(status.drain_id, "cold_migrate")
    assert start.state == "done"
    if start_result is not None:
        assert start.result == start_result
    confirms = lab.steps(status.drain_id, "confirm_migration")
    assert [(s.state, s.result) for s in confirms] == [("done", r) for r in confirm_results]
    # Both coordinators' requests for the server: the one migrate, then the one confirm.
    assert len(fault_proxy.seen("POST", ACTION.format(stopped))) == 2
    assert not [s for s in lab.steps(status.drain_id) if s.state == "intent"]


def test_libvirt_driver_cannot_cold_migrate_and_says_so(cluster: Cluster) -> None:  # noqa: F811
    policy = cpb.DrainPolicy(non_live_action=COLD)
    plan = cluster.stub.PlanDrain(cpb.PlanDrainRequest(host="host1", policy=policy), timeout=T)
    reasons = {u.vm_uuid: u.reason for u in plan.unmovable}
    for vm, state in ((STOPPED, "shutoff"), (FROZEN, "paused")):
        assert reasons[vm.uuid] == (
            f"the VM is {state}: not live-migratable, and this driver cannot cold-migrate; "
            "left in place"
        )
    events = list(cluster.stub.Drain(cpb.DrainRequest(host="host1", policy=policy), timeout=60))
    final = events[-1].status
    assert final.state == cpb.DRAIN_STATE_INCOMPLETE
    vms = {v.vm_uuid: v for v in final.vms}
    for vm in (STOPPED, FROZEN):
        assert vms[vm.uuid].state == cpb.VM_STATE_UNMOVABLE
        assert reasons[vm.uuid] == vms[vm.uuid].error
    assert not [s for s in cluster.coordinator.journal.steps(final.drain_id) if "cold" in s.action]
