"""The coordinator over real gRPC, with real agents on libvirt's test:/// hosts.

test:/// cannot migrate, so drains here end INCOMPLETE with each VM's reason:
what is proven is the contract (plans, events, state, errors, undrain). Real
migrations are proven on the KVM lab.
"""

from __future__ import annotations

import grpc
import pytest

from hostmaint.protos import coordinator_pb2 as cpb
from tests.agent.conftest import DB, DONGLE, FROZEN, GPU, STOPPED, WEB
from tests.coordinator.conftest import Cluster

T = 30


def _status(fn: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()  # type: ignore[operator]
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def test_list_agents(cluster: Cluster) -> None:
    agents = {a.host: a for a in cluster.stub.ListAgents(cpb.ListAgentsRequest(), timeout=T).agents}
    assert set(agents) == {"host1", "host2"}
    assert all(a.health == "SERVING" for a in agents.values())
    assert agents["host1"].last_report.domain_count == 6
    assert agents["host1"].address.startswith("127.0.0.1:")


def test_plan_accounts_for_every_vm(cluster: Cluster) -> None:
    plan = cluster.stub.PlanDrain(cpb.PlanDrainRequest(host="host1"), timeout=T)
    planned = {m.vm_uuid for m in plan.migrations}
    unmovable = {u.vm_uuid: u.reason for u in plan.unmovable}
    assert planned | set(unmovable) == {d.uuid for d in (WEB, DB, GPU, DONGLE, STOPPED, FROZEN)}
    assert not planned & set(unmovable)
    assert "PCI device" in unmovable[GPU.uuid]
    assert "usb host device" in unmovable[DONGLE.uuid]
    assert "shutoff" in unmovable[STOPPED.uuid]
    assert "paused" in unmovable[FROZEN.uuid]
    assert {m.vm_uuid for m in plan.migrations} == {WEB.uuid, DB.uuid}, unmovable
    assert all(m.target_host == "host2" for m in plan.migrations)
    sizes = {m.vm_uuid: m.memory_bytes for m in plan.migrations}
    assert sizes == {WEB.uuid: WEB.memory_mib * 2**20, DB.uuid: DB.memory_mib * 2**20}
    assert plan.predicted_makespan_s >= plan.lower_bound_s > 0
    # Planning changes nothing: host1 is still enabled and has no drain.
    code, _ = _status(lambda: cluster.stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T))
    assert code == grpc.StatusCode.NOT_FOUND
    assert plan.deadline_s == 0 and list(plan.warnings) == []


def test_plan_warns_when_the_deadline_cannot_be_met(cluster: Cluster) -> None:
    policy = cpb.DrainPolicy(deadline_s=0.5)
    plan = cluster.stub.PlanDrain(cpb.PlanDrainRequest(host="host1", policy=policy), timeout=T)
    assert plan.deadline_s == 0.5
    assert plan.predicted_makespan_s > 0.5
    assert any("deadline" in w for w in plan.warnings), plan.warnings


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (cpb.PlanDrainRequest(host=""), grpc.StatusCode.INVALID_ARGUMENT, "host"),
        (cpb.PlanDrainRequest(host="bad host!"), grpc.StatusCode.INVALID_ARGUMENT, "host name"),
        (cpb.PlanDrainRequest(host="host9"), grpc.StatusCode.NOT_FOUND, "host9"),
        (
            cpb.PlanDrainRequest(host="host1", policy=cpb.DrainPolicy(max_downtime_ms=10**9)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_downtime_ms",
        ),
        (
            cpb.PlanDrainRequest(
                host="host1", policy=cpb.DrainPolicy(max_parallel_per_source=1000)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_parallel",
        ),
        (
            cpb.PlanDrainRequest(host="host1", policy=cpb.DrainPolicy(deadline_s=-5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "deadline",
        ),
        (
            cpb.PlanDrainRequest(
                host="host1", policy=cpb.DrainPolicy(postcopy_avoidance_stretch=2.0)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "postcopy_avoidance_stretch",
        ),
        (
            cpb.PlanDrainRequest(
                host="host1", policy=cpb.DrainPolicy(vm_max_downtime_ms={"nope": 100})
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UUID",
        ),
        (
            cpb.PlanDrainRequest(host="host1", policy=cpb.DrainPolicy(target_hosts=["host7"])),
            grpc.StatusCode.NOT_FOUND,
            "host7",
        ),
    ],
)
def test_plan_bad_input(
    cluster: Cluster, request_: cpb.PlanDrainRequest, code: grpc.StatusCode, words: str
) -> None:
    got, details = _status(lambda: cluster.stub.PlanDrain(request_, timeout=T))
    assert got == code, details
    assert words in details


def test_drain_streams_to_the_end_and_undrain(cluster: Cluster) -> None:
    events = list(cluster.stub.Drain(cpb.DrainRequest(host="host1", reason="bios"), timeout=60))
    kinds = [e.kind for e in events]
    assert kinds[0] == cpb.DRAIN_EVENT_KIND_STARTED
    assert cpb.DRAIN_EVENT_KIND_HOST_DISABLED in kinds
    assert cpb.DRAIN_EVENT_KIND_PLANNED in kinds
    assert kinds[-1] == cpb.DRAIN_EVENT_KIND_FINISHED
    final = events[-1].status
    # test:/// refuses migrations: each movable VM was tried, retried and reported.
    assert final.state == cpb.DRAIN_STATE_INCOMPLETE
    by_uuid = {v.vm_uuid: v for v in final.vms}
    for uuid in (WEB.uuid, DB.uuid):
        assert by_uuid[uuid].state == cpb.VM_STATE_FAILED
        assert by_uuid[uuid].attempts == 2
        assert by_uuid[uuid].error
    assert by_uuid[GPU.uuid].state == cpb.VM_STATE_UNMOVABLE
    assert final.summary.migrated == 0
    assert final.summary.failed == 2
    assert cluster.coordinator.journal.disabled_reason("host1") == "bios"
    status = cluster.stub.GetDrain(cpb.GetDrainRequest(host="host1"), timeout=T)
    assert status.drain_id == final.drain_id and status.state == cpb.DRAIN_STATE_INCOMPLETE
    code, _ = _status(
        lambda: cluster.stub.CancelDrain(cpb.CancelDrainRequest(host="host1"), timeout=T)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # finished already
    answer = cluster.stub.Undrain(cpb.UndrainRequest(host="host1"), timeout=T)
    assert answer.enabled
    assert cluster.coordinator.journal.disabled_reason("host1") is None


def test_drain_refused_when_the_source_agent_is_down(cluster: Cluster) -> None:
    cluster.agents["host1"].stop()
    code, details = _status(
        lambda: list(cluster.stub.Drain(cpb.DrainRequest(host="host1"), timeout=T))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "agent" in details
    assert cluster.coordinator.journal.latest_drain("host1") is None  # nothing recorded
    assert cluster.coordinator.journal.disabled_reason("host1") is None  # nothing disabled


def test_get_and_cancel_unknown(cluster: Cluster) -> None:
    for call in (
        lambda: cluster.stub.GetDrain(cpb.GetDrainRequest(drain_id="missing"), timeout=T),
        lambda: cluster.stub.CancelDrain(cpb.CancelDrainRequest(host="host2"), timeout=T),
        lambda: cluster.stub.Undrain(cpb.UndrainRequest(host="nohost"), timeout=T),
    ):
        code, _ = _status(call)
        assert code == grpc.StatusCode.NOT_FOUND
