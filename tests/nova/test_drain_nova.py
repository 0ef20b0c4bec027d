"""Drains through the real Nova: the coordinator over gRPC, agents on test:/// hosts.

Nova (API, conductor, scheduler, placement, three nova-compute services with
the per-server fake driver) is the session's; each test creates its own
servers on host1, starts agents whose test:/// domains carry the servers'
uuids, and a coordinator with the `nova` driver. Outcomes are read back from
Nova's API: service status, each server's host and status, migration records.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from hostmaint.coordinator.journal import StepRow
from hostmaint.lab.faultproxy import Fault, FaultProxy
from hostmaint.protos import coordinator_pb2 as cpb

from .conftest import NovaAdmin, NovaProcess
from .drainlab import HOLD, QUICK_STALL, DrainLab, T, lab_fixture, purge, wait_until

pytestmark = pytest.mark.nova

ACTION = r"^/v2\.1/servers/{}/action$"
SERVICES = r"^/v2\.1/os-services/[^/?]+$"


@pytest.fixture(scope="module", autouse=True)
def clean_nova(nova: NovaProcess) -> None:
    admin = NovaAdmin(nova)
    try:
        purge(admin)
    finally:
        admin.http.close()


@pytest.fixture
def lab(nova_admin: NovaAdmin, tmp_path: Path) -> Iterator[DrainLab]:
    yield from lab_fixture(nova_admin, tmp_path)


def _code(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def test_drain_moves_every_server_and_undrain_enables(lab: DrainLab) -> None:
    servers = [lab.server(migration_s=0.5) for _ in range(3)] + [lab.server(flavor="2")]
    lab.start()
    assert lab.stub is not None
    reason = "maintenance: firmware 2.1"
    stream = lab.drain(reason=reason)
    finished = stream.finished()
    assert finished.status.state == cpb.DRAIN_STATE_COMPLETED, finished.status
    drain_id = finished.drain_id

    service = lab.service("host1")
    assert (service["status"], service["disabled_reason"]) == ("disabled", reason)
    for server_id in servers:
        server = lab.admin.server(server_id)
        assert server["OS-EXT-SRV-ATTR:host"] in ("host2", "host3"), server_id
        assert server["status"] == "ACTIVE"
        assert server["OS-EXT-STS:task_state"] is None
        records = lab.live_migrations(server_id)
        assert [(m["status"], m["source_compute"]) for m in records] == [("completed", "host1")]
        assert records[0]["dest_compute"] == server["OS-EXT-SRV-ATTR:host"]
        assert stream.kinds(server_id).count("MIGRATION_COMPLETED") == 1

    status = lab.stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T)
    assert status.drain_id == drain_id
    assert status.state == cpb.DRAIN_STATE_COMPLETED
    assert status.reason == reason
    assert {v.vm_uuid: v.state for v in status.vms} == {s: cpb.VM_STATE_COMPLETED for s in servers}
    assert {v.vm_uuid: v.target_host for v in status.vms} == {s: lab.host_of(s) for s in servers}
    assert status.summary.migrated == len(servers)
    kinds = stream.kinds()
    assert kinds[:2] == ["STARTED", "HOST_DISABLED"]
    assert kinds.count("PLANNED") == 1

    # Host still disabled: a second Drain reports the finished drain again.
    again = lab.drain(reason="again")
    repeat = again.finished()
    assert repeat.drain_id == drain_id
    assert repeat.status.state == cpb.DRAIN_STATE_COMPLETED
    # It is the same drain, reported again (its events from the start): nothing new runs.
    assert {e.drain_id for e in again.events} == {drain_id}
    assert again.kinds()[-1] == "FINISHED"
    assert again.kinds().count("FINISHED") == 1
    for server_id in servers:
        assert len(lab.live_migrations(server_id)) == 1

    answer = lab.stub.Undrain(cpb.UndrainRequest(host="host1"), timeout=T)
    assert answer.enabled
    assert lab.service("host1")["status"] == "enabled"


def _attempts(lab: DrainLab, drain_id: str, vm_uuid: str) -> list[list[str]]:
    """The tune steps of each attempt of one VM, as `action:state`, split at each start."""
    attempts: list[list[str]] = []
    for step in lab.steps(drain_id):
        if step.vm_uuid != vm_uuid:
            continue
        if step.action == "start_migration":
            attempts.append([])
        elif step.action in ("tune", "abort"):
            attempts[-1].append(f"{step.detail.get('action', step.action)}:{step.state}")
    return attempts


def test_held_migration_is_force_completed_when_postcopy_allowed(lab: DrainLab) -> None:
    held = lab.server(migration_s=HOLD)
    lab.start(drain=QUICK_STALL)
    stream = lab.drain(allow_postcopy=True, forbid_auto_converge=True)
    finished = stream.finished()
    assert finished.status.state == cpb.DRAIN_STATE_COMPLETED, finished.status

    server = lab.admin.server(held)
    assert server["OS-EXT-SRV-ATTR:host"] in ("host2", "host3")
    assert server["status"] == "ACTIVE"
    assert [m["status"] for m in lab.live_migrations(held)] == ["completed"]
    # The downtime raise goes to the agent, which has no libvirt job to tune on
    # test:///; post-copy is Nova's force-complete, once.
    assert _attempts(lab, finished.drain_id, held) == [
        [f"raise_downtime={_raised(lab, finished.drain_id)}:failed", "postcopy:done"]
    ]
    (vm,) = finished.status.vms
    assert vm.state == cpb.VM_STATE_COMPLETED
    assert list(vm.tuning_applied) == ["postcopy"]
    assert stream.kinds(held).count("TUNED") == 2


def _raised(lab: DrainLab, drain_id: str) -> str:
    """The downtime limit the escalation asked for (the planner's cap)."""
    (step,) = [
        s
        for s in lab.steps(drain_id, "tune")
        if str(s.detail["action"]).startswith("raise_downtime=")
    ][:1]
    return str(step.detail["action"]).removeprefix("raise_downtime=")


def test_held_migration_is_aborted_without_postcopy_and_reported(lab: DrainLab) -> None:
    held = lab.server(migration_s=HOLD)
    lab.start(drain=QUICK_STALL)
    stream = lab.drain(allow_postcopy=False, forbid_auto_converge=True)
    finished = stream.finished(timeout_s=120)
    assert finished.status.state == cpb.DRAIN_STATE_INCOMPLETE, finished.status

    server = lab.admin.server(held)
    assert server["OS-EXT-SRV-ATTR:host"] == "host1"
    assert server["status"] == "ACTIVE"
    assert server["OS-EXT-STS:task_state"] is None
    records = lab.live_migrations(held)
    assert [m["status"] for m in records] == ["cancelled", "cancelled"]
    # The retry went to the other target.
    assert {m["dest_compute"] for m in records} == {"host2", "host3"}
    (vm,) = finished.status.vms
    assert vm.state == cpb.VM_STATE_FAILED
    assert vm.attempts == 2
    assert "cancelled" in vm.error
    raised = _raised(lab, finished.drain_id)
    assert _attempts(lab, finished.drain_id, held) == [
        [f"raise_downtime={raised}:failed", "abort:done"],
        [f"raise_downtime={raised}:failed", "abort:done"],
    ]
    assert stream.kinds(held).count("RETRIED") == 1
    assert stream.kinds(held)[-1] == "MIGRATION_FAILED"


def test_lost_migrate_request_is_retried_without_a_second_migration(
    lab: DrainLab, fault_proxy: FaultProxy
) -> None:
    vm = lab.server(migration_s=0.5)
    # Nova never sees the first os-migrateLive: the proxy answers 500 itself.
    fault = fault_proxy.add(
        Fault(method="POST", path=ACTION.format(vm), status=500, forward=False, times=1)
    )
    lab.start(endpoint=f"{fault_proxy.url}/v2.1")
    finished = lab.drain().finished()
    assert finished.status.state == cpb.DRAIN_STATE_COMPLETED, finished.status
    assert fault.matched == 1

    server = lab.admin.server(vm)
    assert server["OS-EXT-SRV-ATTR:host"] in ("host2", "host3")
    assert server["status"] == "ACTIVE"
    records = lab.live_migrations(vm)
    assert [m["status"] for m in records] == ["completed"]
    posts = fault_proxy.seen("POST", ACTION.format(vm))
    assert [(p.status, p.forwarded) for p in posts] == [(500, False), (202, True)]
    starts = lab.steps(finished.drain_id, "start_migration")
    assert [s.state for s in starts] == ["failed", "done"]
    assert "500" in starts[0].result
    # The second try went elsewhere than the first, and is where the server is now.
    assert starts[1].detail["target"] != starts[0].detail["target"]
    assert starts[1].detail["target"] == server["OS-EXT-SRV-ATTR:host"]


def test_conflict_is_retried_on_another_target_or_reported(
    lab: DrainLab, fault_proxy: FaultProxy
) -> None:
    once = lab.server(migration_s=0.5)
    always = lab.server(migration_s=0.5)
    fault_proxy.add(Fault(method="POST", path=ACTION.format(once), status=409, times=1))
    fault_proxy.add(Fault(method="POST", path=ACTION.format(always), status=409, times=None))
    lab.start(endpoint=f"{fault_proxy.url}/v2.1")
    stream = lab.drain()
    finished = stream.finished()
    assert finished.status.state == cpb.DRAIN_STATE_INCOMPLETE, finished.status
    vms = {v.vm_uuid: v for v in finished.status.vms}

    moved = lab.admin.server(once)
    assert moved["OS-EXT-SRV-ATTR:host"] in ("host2", "host3")
    assert [m["status"] for m in lab.live_migrations(once)] == ["completed"]
    assert vms[once].state == cpb.VM_STATE_COMPLETED
    starts = [s for s in lab.steps(finished.drain_id, "start_migration") if s.vm_uuid == once]
    assert [s.state for s in starts] == ["failed", "done"]
    assert starts[0].detail["target"] != starts[1].detail["target"]

    stayed = lab.admin.server(always)
    assert (stayed["OS-EXT-SRV-ATTR:host"], stayed["status"]) == ("host1", "ACTIVE")
    assert lab.live_migrations(always) == []
    assert vms[always].state == cpb.VM_STATE_FAILED
    assert vms[always].attempts == 2
    assert "injected by faultproxy" in vms[always].error
    assert len(fault_proxy.seen("POST", ACTION.format(always))) == 2
    assert stream.kinds(always)[-1] == "MIGRATION_FAILED"


def test_disable_refused_fails_the_drain_and_moves_nothing(
    lab: DrainLab, fault_proxy: FaultProxy
) -> None:
    vms = [lab.server(migration_s=0.5) for _ in range(2)]
    fault_proxy.add(Fault(method="PUT", path=SERVICES, status=503, times=None))
    lab.start(endpoint=f"{fault_proxy.url}/v2.1")
    assert lab.stub is not None
    stream = lab.drain(reason="disk swap")
    finished = stream.finished()
    assert finished.status.state == cpb.DRAIN_STATE_FAILED, finished.status
    assert "cloud API is unavailable" in finished.message
    assert "503" in finished.message and "os-services" in finished.message
    assert stream.kinds() == ["STARTED", "FINISHED"]
    # The PUT was sent once (an action is never repeated blindly) and Nova never saw it.
    puts = fault_proxy.seen("PUT", SERVICES)
    assert [(p.status, p.forwarded) for p in puts] == [(503, False)]
    assert lab.service("host1")["status"] == "enabled"
    for vm in vms:
        assert lab.host_of(vm) == "host1"
        assert lab.live_migrations(vm) == []
    status = lab.stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T)
    assert status.state == cpb.DRAIN_STATE_FAILED
    assert [s.state for s in lab.steps(finished.drain_id)] == ["failed"]


def test_bad_requests_are_refused_with_their_codes(lab: DrainLab) -> None:
    held = lab.server(migration_s=HOLD)
    lab.start()
    stub = lab.stub
    assert stub is not None
    code, details = _code(lambda: list(stub.Drain(cpb.DrainRequest(host="host9"), timeout=T)))
    assert code == grpc.StatusCode.NOT_FOUND and "host9" in details

    stream = lab.drain()
    started = stream.wait_for(lambda e: e.kind == cpb.DRAIN_EVENT_KIND_MIGRATION_STARTED)
    code, details = _code(lambda: list(stub.Drain(cpb.DrainRequest(host="host1"), timeout=T)))
    assert code == grpc.StatusCode.ABORTED and started.drain_id in details
    code, details = _code(lambda: stub.Undrain(cpb.UndrainRequest(host="host1"), timeout=T))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "cancel it first" in details
    assert lab.service("host1")["status"] == "disabled"
    status = lab.stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T)
    assert status.state == cpb.DRAIN_STATE_RUNNING
    assert [v.state for v in status.vms] == [cpb.VM_STATE_MIGRATING]

    # Cancelling with abort ends the held migration through Nova; the VM stays.
    lab.stub.CancelDrain(cpb.CancelDrainRequest(host="host1", abort_running=True), timeout=T)
    finished = stream.finished()
    assert finished.status.state == cpb.DRAIN_STATE_CANCELLED
    assert [m["status"] for m in lab.live_migrations(held)] == ["cancelled"]
    wait_until(lambda: lab.admin.server(held)["OS-EXT-STS:task_state"] is None, T, "settled")
    assert (lab.host_of(held), lab.admin.server(held)["status"]) == ("host1", "ACTIVE")
    assert lab.stub.Undrain(cpb.UndrainRequest(host="host1"), timeout=T).enabled
    assert lab.service("host1")["status"] == "enabled"


def _wait_finished(lab: DrainLab, timeout_s: float = 90.0) -> cpb.DrainStatus:
    stub = lab.stub
    assert stub is not None
    done = (
        cpb.DRAIN_STATE_COMPLETED,
        cpb.DRAIN_STATE_INCOMPLETE,
        cpb.DRAIN_STATE_CANCELLED,
        cpb.DRAIN_STATE_FAILED,
    )
    wait_until(
        lambda: stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T).state in done,
        timeout_s,
        "the drain finishes",
    )
    return stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T)


def _each_started_once(lab: DrainLab, drain_id: str, vms: list[str]) -> list[StepRow]:
    """Every server moved by exactly one live migration, and each attempt started once."""
    for vm in vms:
        records = lab.live_migrations(vm)
        assert [m["status"] for m in records] == ["completed"], (vm, records)
        server = lab.admin.server(vm)
        assert server["OS-EXT-SRV-ATTR:host"] == records[0]["dest_compute"] != "host1"
        assert server["status"] == "ACTIVE"
    starts = lab.steps(drain_id, "start_migration")
    done = Counter((s.vm_uuid, s.detail["attempt"]) for s in starts if s.state == "done")
    assert set(vm for vm, _ in done) == set(vms)
    assert max(done.values()) == 1, done
    assert not [s for s in lab.steps(drain_id) if s.state == "intent"]
    return starts


def test_coordinator_stopped_mid_drain_resumes_without_migrating_twice(lab: DrainLab) -> None:
    vms = [lab.server(migration_s=3) for _ in range(2)]
    lab.start()
    stream = lab.drain(max_parallel_per_source=1)
    first = stream.wait_for(lambda e: e.kind == cpb.DRAIN_EVENT_KIND_MIGRATION_STARTED)
    lab.kill_coordinator()
    stream.cancel()
    # One migration runs on in Nova; the other waits for its turn.
    assert sorted(len(lab.live_migrations(vm)) for vm in vms) == [0, 1]

    lab.start_coordinator()
    status = _wait_finished(lab)
    assert status.drain_id == first.drain_id
    assert status.state == cpb.DRAIN_STATE_COMPLETED, status
    starts = _each_started_once(lab, status.drain_id, vms)
    # The one running at the stop was re-attached, not started again.
    assert len([s for s in starts if s.vm_uuid == first.vm_uuid]) == 1
    assert len(starts) == len(vms)


def test_coordinator_killed_with_a_request_in_flight_adopts_its_migration(
    lab: DrainLab, fault_proxy: FaultProxy
) -> None:
    vms = [lab.server(migration_s=1)]
    endpoint = f"{fault_proxy.url}/v2.1"
    # The first os-migrateLive is held by the proxy, then reaches Nova anyway.
    fault = fault_proxy.add(Fault(method="POST", path=ACTION.format("[^/]+"), delay_s=2.0, times=1))
    lab.start_agents(("host1", "host2", "host3"))
    proc = lab.spawn_coordinator(endpoint)
    stream = lab.drain()
    wait_until(lambda: fault.matched == 1, T, "the first migrate request is in flight")
    proc.kill()
    proc.wait(T)
    stream.cancel()
    wait_until(lambda: bool(fault_proxy.seen("POST", ACTION.format("[^/]+"))), T, "forwarded")
    (post,) = fault_proxy.seen("POST", ACTION.format("[^/]+"))
    assert post.forwarded and post.status == 202
    held = post.path.split("/")[3]
    assert held in vms

    lab.start_coordinator(endpoint)
    status = _wait_finished(lab)
    assert status.state == cpb.DRAIN_STATE_COMPLETED, status
    starts = _each_started_once(lab, status.drain_id, vms)
    (step,) = [s for s in starts if s.vm_uuid == held]
    assert (step.state, step.result) == ("done", "started before the restart")


def test_a_cloud_that_keeps_failing_the_start_is_asked_max_attempts_times(
    lab: DrainLab, fault_proxy: FaultProxy
) -> None:
    vm = lab.server(migration_s=0.5)
    fault_proxy.add(
        Fault(method="POST", path=ACTION.format(vm), status=503, forward=False, times=None)
    )
    lab.start(endpoint=f"{fault_proxy.url}/v2.1")
    finished = lab.drain().finished()
    assert finished.status.state == cpb.DRAIN_STATE_INCOMPLETE, finished.status
    (row,) = finished.status.vms
    assert row.state == cpb.VM_STATE_FAILED and "503" in row.error
    posts = fault_proxy.seen("POST", ACTION.format(vm))
    starts = lab.steps(finished.drain_id, "start_migration")
    assert len(posts) == len(starts) == row.attempts >= 1
    assert lab.admin.server(vm)["OS-EXT-SRV-ATTR:host"] == "host1"
    assert lab.live_migrations(vm) == []
