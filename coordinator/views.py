"""Conversions between the coordinator's values and the hostmaint.v1 messages."""

from __future__ import annotations

import json
from collections.abc import Sequence

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from hostmaint.coordinator import errors
from hostmaint.coordinator.escalation import Action
from hostmaint.coordinator.journal import DrainRow, StepRow, VmRow
from hostmaint.coordinator.limits import (
    MAX_DEADLINE_S,
    MAX_DOWNTIME_MS,
    MAX_PARALLEL,
    MAX_POSTCOPY_STRETCH,
)
from hostmaint.coordinator.model import DrainPolicy, Tuning, VmSpec
from hostmaint.coordinator.planner import DrainPlan
from hostmaint.coordinator.states import DrainState, VmState
from hostmaint.protos import coordinator_pb2 as cpb

TUNINGS = {
    Tuning.NONE: cpb.TUNING_NONE,
    Tuning.RAISE_DOWNTIME: cpb.TUNING_RAISE_DOWNTIME,
    Tuning.AUTO_CONVERGE: cpb.TUNING_AUTO_CONVERGE,
    Tuning.POSTCOPY: cpb.TUNING_POSTCOPY,
    Tuning.CANNOT_CONVERGE: cpb.TUNING_CANNOT_CONVERGE,
}
DRAIN_STATES = {
    DrainState.PLANNING: cpb.DRAIN_STATE_PLANNING,
    DrainState.RUNNING: cpb.DRAIN_STATE_RUNNING,
    DrainState.CANCELLING: cpb.DRAIN_STATE_CANCELLING,
    DrainState.COMPLETED: cpb.DRAIN_STATE_COMPLETED,
    DrainState.INCOMPLETE: cpb.DRAIN_STATE_INCOMPLETE,
    DrainState.CANCELLED: cpb.DRAIN_STATE_CANCELLED,
    DrainState.FAILED: cpb.DRAIN_STATE_FAILED,
}
VM_STATES = {
    VmState.QUEUED: cpb.VM_STATE_QUEUED,
    VmState.MIGRATING: cpb.VM_STATE_MIGRATING,
    VmState.COMPLETED: cpb.VM_STATE_COMPLETED,
    VmState.FAILED: cpb.VM_STATE_FAILED,
    VmState.UNMOVABLE: cpb.VM_STATE_UNMOVABLE,
    VmState.SKIPPED: cpb.VM_STATE_SKIPPED,
    VmState.POSTCOPY_PAUSED: cpb.VM_STATE_POSTCOPY_PAUSED,
    VmState.STRANDED: cpb.VM_STATE_STRANDED,
}


def timestamp(epoch_s: float | None) -> Timestamp | None:
    if epoch_s is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(epoch_s * 1e9))
    return ts


def validate_policy(policy: cpb.DrainPolicy, defaults: DrainPolicy) -> DrainPolicy:
    """A request's policy, checked and completed with the coordinator's defaults."""
    if policy.max_downtime_ms > MAX_DOWNTIME_MS:
        raise errors.InvalidArgument("policy.max_downtime_ms", f"at most {MAX_DOWNTIME_MS}")
    for uuid, ms in policy.vm_max_downtime_ms.items():
        if not 0 < ms <= MAX_DOWNTIME_MS:
            raise errors.InvalidArgument(
                "policy.vm_max_downtime_ms", f"{uuid}: between 1 and {MAX_DOWNTIME_MS}"
            )
    for name, value in (
        ("policy.max_parallel_per_source", policy.max_parallel_per_source),
        ("policy.max_parallel_per_target", policy.max_parallel_per_target),
    ):
        if value > MAX_PARALLEL:
            raise errors.InvalidArgument(name, f"at most {MAX_PARALLEL}")
    if not 0 <= policy.deadline_s <= MAX_DEADLINE_S:
        raise errors.InvalidArgument("policy.deadline_s", f"between 0 and {MAX_DEADLINE_S:.0f}")
    if policy.non_live_action not in cpb.NonLiveAction.values():
        raise errors.InvalidArgument("policy.non_live_action", "unknown action")
    stretch = defaults.postcopy_avoidance_stretch
    if policy.HasField("postcopy_avoidance_stretch"):
        stretch = policy.postcopy_avoidance_stretch
        if not 0.0 <= stretch <= MAX_POSTCOPY_STRETCH:
            raise errors.InvalidArgument(
                "policy.postcopy_avoidance_stretch", f"between 0 and {MAX_POSTCOPY_STRETCH}"
            )
    return DrainPolicy(
        max_downtime_ms=float(policy.max_downtime_ms or defaults.max_downtime_ms),
        max_parallel_per_source=policy.max_parallel_per_source or defaults.max_parallel_per_source,
        max_parallel_per_target=policy.max_parallel_per_target or defaults.max_parallel_per_target,
        allow_postcopy=policy.allow_postcopy,
        allow_auto_converge=not policy.forbid_auto_converge,
        deadline_s=policy.deadline_s or None,
        postcopy_avoidance_stretch=stretch,
    )


def policy_to_json(policy: cpb.DrainPolicy) -> str:
    return json_format.MessageToJson(policy, sort_keys=True)


def policy_from_json(text: str) -> cpb.DrainPolicy:
    return json_format.Parse(text, cpb.DrainPolicy())


def plan_to_pb(
    host: str,
    plan: DrainPlan,
    link_bytes_per_s: float,
    vms: Sequence[VmSpec] = (),
    extra_unmovable: Sequence[tuple[str, str, str]] = (),
    cold: Sequence[tuple[str, str, str, str]] = (),
) -> cpb.DrainPlan:
    """The plan as the API shows it; `cold` is (uuid, name, target or "", reason)."""
    msg = cpb.DrainPlan(
        host=host,
        predicted_makespan_s=plan.predicted_makespan_s,
        lower_bound_s=plan.lower_bound_s,
        link_bandwidth_bytes_per_s=link_bytes_per_s,
        deadline_s=plan.deadline_s or 0.0,
        warnings=list(plan.warnings),
        notes=list(plan.notes),
    )
    specs = {v.uuid: v for v in vms}
    for m in plan.migrations:
        spec = specs.get(m.vm_uuid)
        msg.migrations.append(
            cpb.PlannedMigration(
                vm_uuid=m.vm_uuid,
                name=m.vm_name,
                target_host=m.target or "",
                position=m.position,
                start_s=m.start_s,
                predicted_total_s=m.predicted_total_s,
                predicted_downtime_ms=round(m.predicted_downtime_ms),
                tuning=TUNINGS[m.tuning],
                qemu_max_downtime_ms=round(m.settings.downtime_limit_ms),
                memory_bytes=spec.memory_bytes if spec is not None else 0,
                dirty_rate_bytes_per_s=spec.dirty_rate_bytes_per_s if spec is not None else 0.0,
                holds_link=m.holds_link,
                precopy_tries=m.settings.precopy_tries,
                burst_s=m.settings.burst_s,
            )
        )
    for u in plan.unmovable:
        msg.unmovable.append(cpb.UnmovableVm(vm_uuid=u.vm_uuid, name=u.vm_name, reason=u.reason))
    for uuid, name, reason in extra_unmovable:
        msg.unmovable.append(cpb.UnmovableVm(vm_uuid=uuid, name=name, reason=reason))
    for uuid, name, target, reason in cold:
        msg.cold_migrations.append(
            cpb.ColdMigration(vm_uuid=uuid, name=name, target_host=target, reason=reason)
        )
    return msg


def _tuning_pb(tuning: str) -> cpb.Tuning.ValueType:
    """A journal row's tuning; a VM moved another way (a cold migration) has none."""
    try:
        return TUNINGS[Tuning(tuning)]
    except (KeyError, ValueError):
        return cpb.TUNING_UNSPECIFIED


def vm_to_pb(row: VmRow) -> cpb.VmStatus:
    return cpb.VmStatus(
        vm_uuid=row.vm_uuid,
        name=row.name,
        state=VM_STATES.get(row.state, cpb.VM_STATE_UNSPECIFIED),
        source_host=row.source_host,
        target_host=row.target_host or row.planned_target,
        attempts=row.attempts,
        predicted_total_s=row.predicted_total_s,
        actual_total_s=row.actual_total_s,
        predicted_downtime_ms=round(row.predicted_downtime_ms),
        actual_downtime_ms=round(row.actual_downtime_ms),
        tuning=_tuning_pb(row.tuning),
        tuning_applied=list(row.tuning_applied),
        error=row.error,
        started_at=timestamp(row.started_at),
        finished_at=timestamp(row.finished_at),
        revised_total_s=row.revised_total_s,
        revised_note=row.revised_note,
    )


def step_to_pb(step: StepRow) -> cpb.JournalStep:
    return cpb.JournalStep(
        vm_uuid=step.vm_uuid,
        action=step.action,
        detail_json=json.dumps(step.detail, sort_keys=True),
        state=step.state,
        at=timestamp(step.at),
        done_at=timestamp(step.done_at),
        result=step.result,
    )


def summary(drain: DrainRow, vms: Sequence[VmRow], plan: cpb.DrainPlan | None) -> cpb.DrainSummary:
    done = [v for v in vms if v.state == VmState.COMPLETED]
    end = drain.finished_at
    if end is None:
        end = max((v.finished_at or 0.0 for v in vms), default=drain.created_at)
    return cpb.DrainSummary(
        predicted_makespan_s=plan.predicted_makespan_s if plan is not None else 0.0,
        actual_makespan_s=max(0.0, end - drain.created_at) if drain.finished_at else 0.0,
        max_downtime_ms=round(max((v.actual_downtime_ms for v in done), default=0.0)),
        migrated=len(done),
        failed=sum(1 for v in vms if v.state == VmState.FAILED),
        unmovable=sum(1 for v in vms if v.state in (VmState.UNMOVABLE, VmState.SKIPPED)),
        postcopy_used=sum(1 for v in vms if v.tuned(Action.POSTCOPY)),
        stranded=sum(1 for v in vms if v.state == VmState.STRANDED),
    )


def status_to_pb(drain: DrainRow, vms: Sequence[VmRow]) -> cpb.DrainStatus:
    plan = plan_from_json(drain.plan) if drain.plan else None
    msg = cpb.DrainStatus(
        drain_id=drain.id,
        host=drain.host,
        state=DRAIN_STATES.get(drain.state, cpb.DRAIN_STATE_UNSPECIFIED),
        policy=policy_from_json(drain.policy),
        started_at=timestamp(drain.created_at),
        vms=[vm_to_pb(v) for v in vms],
        summary=summary(drain, vms, plan),
        reason=drain.reason,
    )
    finished = timestamp(drain.finished_at)
    if finished is not None:
        msg.finished_at.CopyFrom(finished)
    if plan is not None:
        msg.plan.CopyFrom(plan)
    return msg


def plan_json(plan: cpb.DrainPlan) -> str:
    return json_format.MessageToJson(plan, sort_keys=True)


def plan_from_json(text: str) -> cpb.DrainPlan:
    """A journaled plan (fields this version does not know, a newer one's, left out)."""
    return json_format.Parse(text, cpb.DrainPlan(), ignore_unknown_fields=True)
