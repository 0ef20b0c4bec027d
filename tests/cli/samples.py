"""Realistic coordinator messages for the CLI tests: a plan, a drain's events, its status."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as pb

GIB = 1024**3
MIB = 1024**2
HOST = "compute-07"
DRAIN_ID = "d7e1c0a2-5b1f-4c55-9a0e-3f1b2c4d5e6f"
T0 = 1_700_000_000.0  # when the drain started, coordinator clock

WEB = "6f1c1a52-1b7e-4d0e-9d1a-000000000001"
DB = "0b9e44d3-8c2a-4f6e-b1d7-000000000002"
# A name longer than any column: it must be cut, never widen or wrap the view.
BATCH = "e2a7f915-3d4c-4b8a-9e6f-000000000003"
BATCH_NAME = "batch-worker-with-a-very-long-instance-name-0042"
GPU = "7c3d2b10-aa5e-4c1f-8d9b-000000000004"


def ts(at_s: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(round(at_s * 1e9))
    return out


def plan() -> pb.DrainPlan:
    return pb.DrainPlan(
        host=HOST,
        migrations=[
            pb.PlannedMigration(
                vm_uuid=DB,
                name="db-1",
                target_host="compute-02",
                position=2,
                start_s=0.0,
                predicted_total_s=28.0,
                predicted_downtime_ms=280,
                predicted_rounds=9,
                tuning=pb.TUNING_RAISE_DOWNTIME,
                qemu_max_downtime_ms=240,
                memory_bytes=8 * GIB,
                dirty_rate_bytes_per_s=60 * MIB,
            ),
            pb.PlannedMigration(
                vm_uuid=WEB,
                name="web-1",
                target_host="",
                position=1,
                start_s=0.0,
                predicted_total_s=20.0,
                predicted_downtime_ms=150,
                predicted_rounds=4,
                tuning=pb.TUNING_NONE,
                qemu_max_downtime_ms=240,
                memory_bytes=2 * GIB,
                dirty_rate_bytes_per_s=5 * MIB,
            ),
            pb.PlannedMigration(
                vm_uuid=BATCH,
                name=BATCH_NAME,
                target_host="compute-03",
                position=3,
                start_s=20.0,
                # The model could not predict this one.
                predicted_total_s=0.0,
                predicted_downtime_ms=0,
                tuning=pb.TUNING_AUTO_CONVERGE,
                memory_bytes=4 * GIB,
                dirty_rate_bytes_per_s=180 * MIB,
            ),
        ],
        unmovable=[
            pb.UnmovableVm(vm_uuid=GPU, name="gpu-1", reason="PCI passthrough 0000:3b:00.0"),
        ],
        predicted_makespan_s=61.5,
        lower_bound_s=41.0,
        link_bandwidth_bytes_per_s=400 * MIB,
    )


def vm(vm_uuid: str, state: int, **fields: object) -> pb.VmStatus:
    planned = {m.vm_uuid: m for m in plan().migrations}[vm_uuid]
    base: dict[str, object] = dict(
        vm_uuid=vm_uuid,
        name=planned.name,
        state=state,
        source_host=HOST,
        target_host=planned.target_host,
        attempts=1,
        predicted_total_s=planned.predicted_total_s,
        predicted_downtime_ms=planned.predicted_downtime_ms,
        tuning=planned.tuning,
    )
    base.update(fields)
    return pb.VmStatus(**base)  # type: ignore[arg-type]


def progress(vm_uuid: str, at_s: float, **fields: object) -> apb.MigrationProgress:
    base: dict[str, object] = dict(
        domain_uuid=vm_uuid,
        phase=apb.MIGRATION_PHASE_PRECOPY,
        max_downtime_ms=240,
        max_downtime_set_by="hostmaint",
        bandwidth_bytes_per_s=380 * MIB,
        sampled_at=ts(at_s),
    )
    base.update(fields)
    return apb.MigrationProgress(**base)  # type: ignore[arg-type]


def event(kind: int, at_s: float, **fields: object) -> pb.DrainEvent:
    return pb.DrainEvent(drain_id=DRAIN_ID, kind=kind, at=ts(at_s), host=HOST, **fields)  # type: ignore[arg-type]


def final_vms(state: int) -> list[pb.VmStatus]:
    web = vm(
        WEB,
        pb.VM_STATE_COMPLETED,
        target_host="compute-05",
        actual_total_s=21.3,
        actual_downtime_ms=171,
    )
    db = vm(
        DB,
        pb.VM_STATE_COMPLETED,
        actual_total_s=33.9,
        actual_downtime_ms=312,
        tuning_applied=["max_downtime_ms=2000"],
    )
    if state == pb.DRAIN_STATE_COMPLETED:
        batch = vm(BATCH, pb.VM_STATE_COMPLETED, actual_total_s=25.0, actual_downtime_ms=290)
    elif state == pb.DRAIN_STATE_CANCELLED:
        batch = vm(BATCH, pb.VM_STATE_SKIPPED, attempts=0)
    else:
        batch = vm(
            BATCH,
            pb.VM_STATE_FAILED,
            attempts=2,
            error="migration did not converge: dirty rate above bandwidth",
        )
    return [web, db, batch]


def final_status(state: int = pb.DRAIN_STATE_INCOMPLETE) -> pb.DrainStatus:
    vms = final_vms(state)
    migrated = sum(1 for v in vms if v.state == pb.VM_STATE_COMPLETED)
    failed = sum(1 for v in vms if v.state == pb.VM_STATE_FAILED)
    return pb.DrainStatus(
        drain_id=DRAIN_ID,
        host=HOST,
        state=state,  # type: ignore[arg-type]
        policy=pb.DrainPolicy(max_downtime_ms=500, allow_postcopy=False),
        started_at=ts(T0),
        finished_at=ts(T0 + 74.2),
        vms=vms,
        summary=pb.DrainSummary(
            predicted_makespan_s=61.5,
            actual_makespan_s=74.2,
            max_downtime_ms=max(v.actual_downtime_ms for v in vms),
            migrated=migrated,
            failed=failed,
            unmovable=1,
            postcopy_used=0,
        ),
        plan=plan(),
        reason="BIOS update",
    )


def running_status() -> pb.DrainStatus:
    return pb.DrainStatus(
        drain_id=DRAIN_ID,
        host=HOST,
        state=pb.DRAIN_STATE_RUNNING,
        policy=pb.DrainPolicy(max_downtime_ms=500),
        started_at=ts(T0),
        vms=[
            vm(WEB, pb.VM_STATE_COMPLETED, actual_total_s=21.3, actual_downtime_ms=171),
            vm(DB, pb.VM_STATE_MIGRATING),
            vm(BATCH, pb.VM_STATE_QUEUED, attempts=0),
        ],
        plan=plan(),
        reason="BIOS update",
    )


def events(final_state: int = pb.DRAIN_STATE_INCOMPLETE) -> list[pb.DrainEvent]:
    """The events of a whole drain of HOST, in the order the coordinator sends them."""
    E = pb.DrainEventKind
    out = [
        event(E.DRAIN_EVENT_KIND_STARTED, T0, message="reason: BIOS update"),
        event(E.DRAIN_EVENT_KIND_HOST_DISABLED, T0 + 0.2, message="nova-compute service disabled"),
        event(E.DRAIN_EVENT_KIND_PLANNED, T0 + 2.0, plan=plan()),
        event(
            E.DRAIN_EVENT_KIND_BLOCKED,
            T0 + 2.0,
            vm_uuid=GPU,
            message="gpu-1: PCI passthrough 0000:3b:00.0",
        ),
    ]
    for uuid in (WEB, DB, BATCH):
        out.append(
            event(
                E.DRAIN_EVENT_KIND_QUEUED, T0 + 2.1, vm_uuid=uuid, vm=vm(uuid, pb.VM_STATE_QUEUED)
            )
        )
    for uuid in (WEB, DB):
        out.append(
            event(
                E.DRAIN_EVENT_KIND_MIGRATION_STARTED,
                T0 + 2.5,
                vm_uuid=uuid,
                vm=vm(uuid, pb.VM_STATE_MIGRATING),
            )
        )
    out += [
        event(
            E.DRAIN_EVENT_KIND_PROGRESS,
            T0 + 12.5,
            vm_uuid=WEB,
            vm=vm(WEB, pb.VM_STATE_MIGRATING, target_host="compute-05"),
            progress=progress(
                WEB,
                T0 + 12.5,
                iteration=2,
                memory_total_bytes=2 * GIB,
                memory_processed_bytes=GIB + GIB // 2,
                memory_remaining_bytes=GIB // 2,
                dirty_rate_bytes_per_s=5 * MIB,
                downtime_ms=120,
                elapsed_ms=10_000,
            ),
        ),
        event(
            E.DRAIN_EVENT_KIND_PROGRESS,
            T0 + 22.5,
            vm_uuid=DB,
            vm=vm(DB, pb.VM_STATE_MIGRATING),
            progress=progress(
                DB,
                T0 + 22.5,
                iteration=7,
                memory_total_bytes=8 * GIB,
                memory_processed_bytes=9 * GIB,
                memory_remaining_bytes=2 * GIB,
                dirty_rate_bytes_per_s=60 * MIB,
                auto_converge_throttle_pct=0,
                downtime_ms=900,
                elapsed_ms=20_000,
            ),
        ),
        event(
            E.DRAIN_EVENT_KIND_MIGRATION_COMPLETED,
            T0 + 23.8,
            vm_uuid=WEB,
            vm=final_vms(final_state)[0],
        ),
        event(
            E.DRAIN_EVENT_KIND_MIGRATION_STARTED,
            T0 + 24.0,
            vm_uuid=BATCH,
            vm=vm(BATCH, pb.VM_STATE_MIGRATING),
        ),
        event(
            E.DRAIN_EVENT_KIND_TUNED,
            T0 + 26.0,
            vm_uuid=DB,
            vm=vm(DB, pb.VM_STATE_MIGRATING, tuning_applied=["max_downtime_ms=2000"]),
            message="stalled at iteration 9: raised the downtime limit",
        ),
        event(
            E.DRAIN_EVENT_KIND_PROGRESS,
            T0 + 27.0,
            vm_uuid=DB,
            vm=vm(DB, pb.VM_STATE_MIGRATING),
            progress=progress(
                DB,
                T0 + 27.0,
                iteration=10,
                memory_total_bytes=8 * GIB,
                memory_remaining_bytes=300 * MIB,
                max_downtime_ms=2000,
                max_downtime_set_by="hostmaint",
                downtime_ms=780,
                elapsed_ms=24_500,
            ),
        ),
        event(
            E.DRAIN_EVENT_KIND_MIGRATION_COMPLETED,
            T0 + 36.4,
            vm_uuid=DB,
            vm=final_vms(final_state)[1],
        ),
        event(
            E.DRAIN_EVENT_KIND_PROGRESS,
            T0 + 40.0,
            vm_uuid=BATCH,
            vm=vm(BATCH, pb.VM_STATE_MIGRATING),
            progress=progress(
                BATCH,
                T0 + 40.0,
                iteration=14,
                memory_total_bytes=4 * GIB,
                memory_remaining_bytes=3 * GIB,
                auto_converge_throttle_pct=60,
                max_downtime_ms=300,
                max_downtime_set_by="external",
                downtime_ms=8100,
                elapsed_ms=16_000,
            ),
        ),
    ]
    if final_state == pb.DRAIN_STATE_COMPLETED:
        out.append(
            event(
                E.DRAIN_EVENT_KIND_MIGRATION_COMPLETED,
                T0 + 60.0,
                vm_uuid=BATCH,
                vm=final_vms(final_state)[2],
            )
        )
    elif final_state != pb.DRAIN_STATE_CANCELLED:
        out += [
            event(
                E.DRAIN_EVENT_KIND_MIGRATION_FAILED,
                T0 + 50.0,
                vm_uuid=BATCH,
                vm=vm(BATCH, pb.VM_STATE_FAILED, error="job aborted: no progress"),
            ),
            event(
                E.DRAIN_EVENT_KIND_RETRIED,
                T0 + 51.0,
                vm_uuid=BATCH,
                vm=vm(BATCH, pb.VM_STATE_QUEUED, attempts=2),
                message="second attempt with post-copy refused by policy: auto-converge",
            ),
            event(
                E.DRAIN_EVENT_KIND_MIGRATION_STARTED,
                T0 + 51.5,
                vm_uuid=BATCH,
                vm=vm(BATCH, pb.VM_STATE_MIGRATING, attempts=2),
            ),
            event(
                E.DRAIN_EVENT_KIND_MIGRATION_FAILED,
                T0 + 74.0,
                vm_uuid=BATCH,
                vm=final_vms(final_state)[2],
            ),
        ]
    out.append(
        event(
            E.DRAIN_EVENT_KIND_FINISHED,
            T0 + 74.2,
            status=final_status(final_state),
            message="drain finished",
        )
    )
    return out


def agents() -> pb.ListAgentsResponse:
    return pb.ListAgentsResponse(
        agents=[
            pb.AgentInfo(
                host="compute-07",
                address="10.0.0.7:7710",
                health="SERVING",
                last_report=apb.HostReport(
                    hostname="compute-07",
                    hypervisor_type="QEMU",
                    hypervisor_version="7.2.0",
                    memory_total_bytes=256 * GIB,
                    memory_free_bytes=64 * GIB,
                    domain_count=5,
                    running_domain_count=4,
                ),
                checked_at=ts(T0 - 5),
            ),
            pb.AgentInfo(
                host="compute-02",
                address="10.0.0.2:7710",
                health="UNREACHABLE",
                error="failed to connect to all addresses",
                checked_at=ts(T0 - 30),
            ),
        ]
    )
