"""What the operator CLI shows: plan, status, summary and agent tables, and one line per event.

Pure: protos in, strings out. No I/O and no clock; whoever draws passes `now`
(seconds since the epoch, the local clock). The live view of a drain, redrawn
in place on a terminal, is `clilive`; the small text helpers are `cliformat`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hostmaint.coordinator.cliformat import (
    clip,
    clock_text,
    drain_state_label,
    event_label,
    iso_text,
    phase_label,
    prediction,
    seconds,
    table,
    timestamp_s,
    transferred_fraction,
    tuning_label,
    uuid8,
    vm_state_label,
    vm_title,
)
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as pb

GIB = 1024**3
MIB = 1024**2
NAME_WIDTH = 24

Ev = pb.DrainEventKind
FINISHED_DRAIN_STATES = frozenset(
    {
        pb.DRAIN_STATE_COMPLETED,
        pb.DRAIN_STATE_INCOMPLETE,
        pb.DRAIN_STATE_CANCELLED,
        pb.DRAIN_STATE_FAILED,
    }
)


# ---- plan --------------------------------------------------------------------------------


def render_plan(plan: pb.DrainPlan) -> str:
    migrations = sorted(plan.migrations, key=lambda m: (m.position, m.start_s))
    head = f"plan for {plan.host}: {len(migrations)} to migrate, {len(plan.unmovable)} unmovable"
    if plan.cold_migrations:
        head += f", {len(plan.cold_migrations)} to cold-migrate"
    if plan.link_bandwidth_bytes_per_s > 0:
        head += f", link {plan.link_bandwidth_bytes_per_s / MIB:.0f} MiB/s"
    lines = [head, ""]
    if migrations:
        rows = [
            [
                str(m.position),
                clip(m.name or "-", NAME_WIDTH),
                uuid8(m.vm_uuid),
                m.target_host or "(scheduler)",
                f"{m.start_s:.1f}",
                f"{m.predicted_total_s:.1f}" if m.predicted_total_s > 0 else "?",
                str(m.predicted_downtime_ms) if m.predicted_downtime_ms else "?",
                tuning_label(m.tuning)
                + (f" after {m.precopy_tries} rounds" if m.precopy_tries else "")
                + (
                    f", burst {m.burst_s:.1f}s"
                    if m.burst_s and m.tuning == pb.TUNING_POSTCOPY
                    else ""
                ),
                f"{m.memory_bytes / GIB:.1f}",
                f"{m.dirty_rate_bytes_per_s / MIB:.1f}",
            ]
            for m in migrations
        ]
        headers = [
            "#",
            "VM",
            "uuid",
            "target",
            "start s",
            "time s",
            "downtime ms",
            "tuning",
            "mem GiB",
            "dirty MiB/s",
        ]
        lines.append(table(headers, rows, right=frozenset({0, 4, 5, 6, 8, 9})))
    else:
        lines.append("nothing to migrate")
    if plan.unmovable:
        lines += ["", "unmovable:"]
        rows = [
            [clip(u.name or "-", NAME_WIDTH), uuid8(u.vm_uuid), u.reason or "-"]
            for u in plan.unmovable
        ]
        lines.append(table(["VM", "uuid", "reason"], rows, right=frozenset()))
    if plan.cold_migrations:
        lines += ["", "cold migrations, after the live ones:"]
        rows = [
            [clip(c.name or "-", NAME_WIDTH), uuid8(c.vm_uuid), c.target_host or "(scheduler)"]
            for c in plan.cold_migrations
        ]
        lines.append(table(["VM", "uuid", "target"], rows, right=frozenset()))
    lines += ["", _makespan_line(plan)]
    lines += [f"warning: {w}" for w in plan.warnings]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _makespan_line(plan: pb.DrainPlan) -> str:
    makespan = plan.predicted_makespan_s
    text = f"predicted makespan {makespan:.1f} s" if makespan > 0 else "predicted makespan ?"
    if plan.lower_bound_s > 0:
        text += f", lower bound {plan.lower_bound_s:.1f} s"
        if makespan > 0:
            text += f", ratio {makespan / plan.lower_bound_s:.2f}"
    else:
        text += ", lower bound ?"
    if plan.deadline_s > 0:
        met = makespan <= plan.deadline_s
        text += f", deadline {plan.deadline_s:.0f} s ({'met' if met else 'missed'})"
    return text


# ---- summary and status ------------------------------------------------------------------


def _vm_tuning(vm: pb.VmStatus) -> str:
    applied = ", ".join(vm.tuning_applied)
    planned = tuning_label(vm.tuning)
    return f"{planned}: {applied}" if applied else planned


def _num(value: float, fmt: str) -> str:
    return format(value, fmt) if value > 0 else "-"


def _revised(vm: pb.VmStatus) -> str:
    """The prediction revised from its own rounds: a time, "never" (its rounds stopped
    shrinking at the last revision), or "-" (none)."""
    if vm.revised_total_s > 0:
        return f"{vm.revised_total_s:.1f}"
    return "never" if vm.revised_note else "-"


def render_vm_table(vms: Sequence[pb.VmStatus]) -> str:
    rows = [
        [
            clip(vm_title(v.name, v.vm_uuid), NAME_WIDTH),
            uuid8(v.vm_uuid),
            vm_state_label(v.state),
            v.target_host or "-",
            _num(v.predicted_total_s, ".1f"),
            _revised(v),
            _num(v.actual_total_s, ".1f"),
            _num(v.predicted_downtime_ms, "d"),
            _num(v.actual_downtime_ms, "d"),
            clip(_vm_tuning(v), 40),
            str(v.attempts),
        ]
        for v in vms
    ]
    headers = [
        "VM",
        "uuid",
        "state",
        "target",
        "pred s",
        "revised s",
        "actual s",
        "pred dt ms",
        "actual dt ms",
        "tuning",
        "tries",
    ]
    lines = [table(headers, rows, right=frozenset({4, 5, 6, 7, 8, 10}))]
    errors = [v for v in vms if v.error]
    for v in errors:
        lines.append(f"  {vm_title(v.name, v.vm_uuid)}: {v.error}")
    return "\n".join(lines)


def _ratio(actual: float, predicted: float) -> str:
    if predicted <= 0 or actual <= 0:
        return ""
    return f" ({(actual - predicted) / predicted * 100:+.0f}%)"


def migration_window(status: pb.DrainStatus) -> tuple[float, float] | None:
    """(seconds from the drain's start to its first migration's, seconds from that to the
    last migration's end): what came before the plan ran (disabling the host, measuring
    dirty rates, planning) and what the plan's predicted makespan predicts. None until
    a migration has ended."""
    t0 = timestamp_s(status.started_at)
    starts = [t for v in status.vms if (t := timestamp_s(v.started_at)) is not None]
    ends = [t for v in status.vms if (t := timestamp_s(v.finished_at)) is not None]
    if t0 is None or not starts or not ends:
        return None
    return max(0.0, min(starts) - t0), max(0.0, max(ends) - min(starts))


def measuring_note(plan: pb.DrainPlan) -> str:
    """The plan's note on where its dirty rates came from (measured, and how long, or the
    agents' background readings, and how old); empty when it has none."""
    return next((n for n in plan.notes if "dirty rate" in n), "")


def window_lines(status: pb.DrainStatus) -> list[str]:
    """The time before the first migration and the migrations' span against the plan."""
    window = migration_window(status)
    if window is None:
        return []
    before, span = window
    predicted = status.summary.predicted_makespan_s
    note = measuring_note(status.plan)
    return [
        f"before the first migration: {seconds(before)}" + (f" ({note})" if note else ""),
        f"migrations: predicted {prediction(predicted)}, took {seconds(span)}"
        f"{_ratio(span, predicted)}",
    ]


def render_summary(status: pb.DrainStatus) -> str:
    s = status.summary
    lines = [
        f"drain {status.drain_id or '?'} of {status.host}: {drain_state_label(status.state)}",
        "",
        render_vm_table(status.vms) if status.vms else "no VMs",
        "",
        f"makespan: predicted {prediction(s.predicted_makespan_s)}, "
        f"actual {seconds(s.actual_makespan_s) if s.actual_makespan_s > 0 else '?'}"
        f"{_ratio(s.actual_makespan_s, s.predicted_makespan_s)}",
        *window_lines(status),
        f"max downtime: {s.max_downtime_ms} ms" + _policy_limit(status.policy),
        f"migrated {s.migrated}, failed {s.failed}, unmovable {s.unmovable}, "
        f"post-copy used {s.postcopy_used}",
    ]
    stranded = [v for v in status.vms if v.state == pb.VM_STATE_STRANDED]
    if stranded:
        lines.append(f"STRANDED {len(stranded)}: their post-copy broke; they run nowhere")
        lines += [f"  {vm_title(v.name, v.vm_uuid)}: {v.error}" for v in stranded]
    return "\n".join(lines)


def _policy_limit(policy: pb.DrainPolicy) -> str:
    if policy.max_downtime_ms:
        return f" (limit {policy.max_downtime_ms} ms)"
    return ""


def render_status(status: pb.DrainStatus, now: float) -> str:
    started = timestamp_s(status.started_at)
    finished = timestamp_s(status.finished_at)
    if started is not None:
        elapsed = (finished if finished is not None else now) - started
        times = f"started {iso_text(status.started_at)}, elapsed {seconds(max(0.0, elapsed))}"
    else:
        times = "not started"
    if finished is not None:
        times += f", finished {iso_text(status.finished_at)}"
    lines = [
        f"drain {status.drain_id or '?'} of {status.host}: {drain_state_label(status.state)}",
        f"  {times}",
    ]
    if status.reason:
        lines.append(f"  reason: {status.reason}")
    counts: dict[str, int] = {}
    for v in status.vms:
        label = vm_state_label(v.state)
        counts[label] = counts.get(label, 0) + 1
    if counts:
        lines.append("  " + ", ".join(f"{n} {label}" for label, n in counts.items()))
    lines += ["", render_vm_table(status.vms) if status.vms else "no VMs"]
    if status.state in FINISHED_DRAIN_STATES and status.HasField("summary"):
        lines += ["", render_summary(status).split("\n\n")[-1]]
    elif status.HasField("plan") and status.plan.predicted_makespan_s > 0:
        lines += ["", _makespan_line(status.plan)]
    return "\n".join(lines)


# ---- agents ------------------------------------------------------------------------------


def render_agents(response: pb.ListAgentsResponse, now: float) -> str:
    rows = []
    for a in sorted(response.agents, key=lambda a: a.host):
        r = a.last_report
        has_report = a.HasField("last_report")
        checked = timestamp_s(a.checked_at)
        rows.append(
            [
                a.host,
                a.address or "-",
                a.health or "UNKNOWN",
                f"{r.hypervisor_type} {r.hypervisor_version}".strip() if has_report else "-",
                f"{r.running_domain_count}/{r.domain_count}" if has_report else "-",
                (
                    f"{r.memory_free_bytes / GIB:.1f}/{r.memory_total_bytes / GIB:.1f} GiB"
                    if has_report
                    else "-"
                ),
                f"{seconds(max(0.0, now - checked))} ago" if checked is not None else "-",
                clip(a.error, 60) or "-",
            ]
        )
    if not rows:
        return "no agents"
    headers = ["host", "address", "health", "hypervisor", "domains", "free memory", "checked"]
    return table([*headers, "error"], rows, right=frozenset({4, 5}))


# ---- one line per event (not a terminal) -------------------------------------------------


def _progress_text(p: apb.MigrationProgress) -> str:
    parts = [phase_label(p.phase)]
    if p.memory_total_bytes:
        parts.append(f"{transferred_fraction(p) * 100:.0f}%")
    parts.append(f"iter {p.iteration}")
    parts.append(f"remaining {p.memory_remaining_bytes / MIB:.0f} MiB")
    parts.append(f"dirty {p.dirty_rate_bytes_per_s / MIB:.1f} MiB/s")
    parts.append(f"bw {p.bandwidth_bytes_per_s / MIB:.1f} MiB/s")
    if p.auto_converge_throttle_pct:
        parts.append(f"throttle {p.auto_converge_throttle_pct}%")
    parts.append(_limit_text(p))
    parts.append(f"expected downtime {p.downtime_ms} ms")
    parts.append(f"elapsed {seconds(p.elapsed_ms / 1000)}")
    return " ".join(parts)


def _limit_text(p: apb.MigrationProgress) -> str:
    if not p.max_downtime_ms:
        return "limit ?"
    by = f" by {p.max_downtime_set_by}" if p.max_downtime_set_by else ""
    return f"limit {p.max_downtime_ms} ms{by}"


def render_event_line(event: pb.DrainEvent) -> str:
    kind = event.kind
    vm = event.vm
    who = vm_title(vm.name, vm.vm_uuid or event.vm_uuid) if (vm.name or vm.vm_uuid) else ""
    if not who and event.vm_uuid:
        who = uuid8(event.vm_uuid)
    detail = ""
    if kind == Ev.DRAIN_EVENT_KIND_STARTED:
        detail = f"drain {event.drain_id} of {event.host}"
    elif kind == Ev.DRAIN_EVENT_KIND_PLANNED:
        plan = event.plan
        detail = (
            f"{len(plan.migrations)} to migrate, {len(plan.unmovable)} unmovable, "
            + _makespan_line(plan)
        )
    elif kind == Ev.DRAIN_EVENT_KIND_QUEUED or kind == Ev.DRAIN_EVENT_KIND_MIGRATION_STARTED:
        detail = (
            f"-> {vm.target_host or '(scheduler)'}, predicted {prediction(vm.predicted_total_s)}"
            f" / {vm.predicted_downtime_ms or '?'} ms, tuning {tuning_label(vm.tuning)}"
        )
    elif kind == Ev.DRAIN_EVENT_KIND_PROGRESS:
        detail = _progress_text(event.progress)
    elif kind == Ev.DRAIN_EVENT_KIND_TUNED:
        detail = ", ".join(vm.tuning_applied)
    elif kind == Ev.DRAIN_EVENT_KIND_MIGRATION_COMPLETED:
        detail = (
            f"-> {vm.target_host or '?'} in {seconds(vm.actual_total_s)} "
            f"(predicted {prediction(vm.predicted_total_s)}), downtime "
            f"{vm.actual_downtime_ms} ms (predicted {vm.predicted_downtime_ms or '?'} ms)"
        )
    elif kind == Ev.DRAIN_EVENT_KIND_MIGRATION_FAILED:
        detail = vm.error or event.progress.error
    elif kind == Ev.DRAIN_EVENT_KIND_RETRIED:
        detail = f"attempt {vm.attempts}" if vm.attempts else ""
    elif kind == Ev.DRAIN_EVENT_KIND_FINISHED:
        st = event.status
        s = st.summary
        detail = (
            f"{drain_state_label(st.state)}: migrated {s.migrated}, failed {s.failed}, "
            f"unmovable {s.unmovable}, makespan {seconds(s.actual_makespan_s)}"
        )
        if s.stranded:
            detail += f"; STRANDED {s.stranded} (post-copy broke: see their errors)"
    parts = [clock_text(event.at), f"{event_label(kind):<19}"]
    if who:
        parts.append(who)
    text = " ".join(p for p in (detail, event.message) if p)
    if text:
        parts.append(text)
    return " ".join(parts)
