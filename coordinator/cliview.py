"""What the operator CLI shows: plan, progress and summary tables as text.

Pure: protos in, strings out. No I/O and no clock; whoever draws passes `now`
(seconds since the epoch, the local clock) and the terminal width. The live
view of a drain is folded from its events (`apply`) and drawn from that state
(`render_live`); on a terminal the caller redraws it in place (`redraw`).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as pb

GIB = 1024**3
MIB = 1024**2
ELLIPSIS = "…"
NOTES_KEPT = 4
MIN_BAR = 6
MAX_BAR = 40
NAME_WIDTH = 24
LIVE_NAME_WIDTH = 20
NARROW = 100
NARROW_NAME_WIDTH = 10
TAIL_ROOM = 25

Ev = pb.DrainEventKind
# The events about one VM's migration (the others are about the drain).
VM_EVENTS = frozenset(
    {
        Ev.DRAIN_EVENT_KIND_QUEUED,
        Ev.DRAIN_EVENT_KIND_MIGRATION_STARTED,
        Ev.DRAIN_EVENT_KIND_PROGRESS,
        Ev.DRAIN_EVENT_KIND_TUNED,
        Ev.DRAIN_EVENT_KIND_MIGRATION_COMPLETED,
        Ev.DRAIN_EVENT_KIND_MIGRATION_FAILED,
        Ev.DRAIN_EVENT_KIND_RETRIED,
    }
)
TERMINAL_VM_STATES = frozenset({pb.VM_STATE_COMPLETED, pb.VM_STATE_FAILED})
FINISHED_DRAIN_STATES = frozenset(
    {
        pb.DRAIN_STATE_COMPLETED,
        pb.DRAIN_STATE_INCOMPLETE,
        pb.DRAIN_STATE_CANCELLED,
        pb.DRAIN_STATE_FAILED,
    }
)


# ---- small formatting helpers ------------------------------------------------------------


def clip(text: str, width: int) -> str:
    """`text` cut to `width` characters, the cut marked with an ellipsis."""
    if width <= 0:
        return ""
    if len(text) <= width:
        return text
    return text[: width - 1] + ELLIPSIS


def uuid8(vm_uuid: str) -> str:
    return vm_uuid[:8] or "-"


def seconds(value_s: float | None) -> str:
    """12.3s, 4m05s, 2h03m; '?' when unknown (None or negative)."""
    if value_s is None or value_s < 0:
        return "?"
    if value_s < 60:
        return f"{value_s:.1f}s"
    whole = round(value_s)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def prediction(value_s: float) -> str:
    """A predicted duration: 0 means the coordinator could not predict it."""
    return seconds(value_s) if value_s > 0 else "?"


def bar(fraction: float, width: int) -> str:
    """[#####-----] with `width` cells inside the brackets (width + 2 characters)."""
    width = max(1, width)
    fraction = min(1.0, max(0.0, fraction))
    filled = int(fraction * width + 1e-9)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def timestamp_s(ts: timestamp_pb2.Timestamp) -> float | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.seconds + ts.nanos / 1e9


def clock_text(ts: timestamp_pb2.Timestamp) -> str:
    at = timestamp_s(ts)
    if at is None:
        return "--:--:--"
    return datetime.datetime.fromtimestamp(at, tz=datetime.UTC).strftime("%H:%M:%S")


def iso_text(ts: timestamp_pb2.Timestamp) -> str:
    at = timestamp_s(ts)
    if at is None:
        return "-"
    return datetime.datetime.fromtimestamp(at, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _label(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower().replace("_", "-")


def tuning_label(value: int) -> str:
    if value == pb.TUNING_UNSPECIFIED:
        return "-"
    try:
        return _label(pb.Tuning.Name(value), "TUNING_")  # type: ignore[arg-type]
    except ValueError:
        return f"tuning-{value}"


def drain_state_label(value: int) -> str:
    try:
        return _label(pb.DrainState.Name(value), "DRAIN_STATE_")  # type: ignore[arg-type]
    except ValueError:
        return f"state-{value}"


def vm_state_label(value: int) -> str:
    try:
        return _label(pb.VmState.Name(value), "VM_STATE_")  # type: ignore[arg-type]
    except ValueError:
        return f"state-{value}"


def phase_label(value: int) -> str:
    try:
        return _label(apb.MigrationPhase.Name(value), "MIGRATION_PHASE_")  # type: ignore[arg-type]
    except ValueError:
        return f"phase-{value}"


def event_label(value: int) -> str:
    try:
        return pb.DrainEventKind.Name(value).removeprefix("DRAIN_EVENT_KIND_")  # type: ignore[arg-type]
    except ValueError:
        return f"EVENT_{value}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int]) -> str:
    """Columns as wide as their widest cell; the columns in `right` right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def vm_title(name: str, vm_uuid: str) -> str:
    return name or uuid8(vm_uuid)


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


def render_vm_table(vms: Sequence[pb.VmStatus]) -> str:
    rows = [
        [
            clip(vm_title(v.name, v.vm_uuid), NAME_WIDTH),
            uuid8(v.vm_uuid),
            vm_state_label(v.state),
            v.target_host or "-",
            _num(v.predicted_total_s, ".1f"),
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
        "actual s",
        "pred dt ms",
        "actual dt ms",
        "tuning",
        "tries",
    ]
    lines = [table(headers, rows, right=frozenset({4, 5, 6, 7, 9}))]
    errors = [v for v in vms if v.error]
    for v in errors:
        lines.append(f"  {vm_title(v.name, v.vm_uuid)}: {v.error}")
    return "\n".join(lines)


def _ratio(actual: float, predicted: float) -> str:
    if predicted <= 0 or actual <= 0:
        return ""
    return f" ({(actual - predicted) / predicted * 100:+.0f}%)"


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
        f"max downtime: {s.max_downtime_ms} ms" + _policy_limit(status.policy),
        f"migrated {s.migrated}, failed {s.failed}, unmovable {s.unmovable}, "
        f"post-copy used {s.postcopy_used}",
    ]
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


def transferred_fraction(p: apb.MigrationProgress) -> float:
    """Share of the guest's memory already on the target (1 - remaining / total)."""
    if p.phase == apb.MIGRATION_PHASE_COMPLETED:
        return 1.0
    if not p.memory_total_bytes:
        return 0.0
    done = p.memory_total_bytes - min(p.memory_remaining_bytes, p.memory_total_bytes)
    return done / p.memory_total_bytes


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
    parts = [clock_text(event.at), f"{event_label(kind):<19}"]
    if who:
        parts.append(who)
    text = " ".join(p for p in (detail, event.message) if p)
    if text:
        parts.append(text)
    return " ".join(parts)


# ---- the live view -----------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    phase: int
    iteration: int
    fraction: float
    max_downtime_ms: int
    max_downtime_set_by: str
    expected_downtime_ms: int
    elapsed_s: float
    sampled_at_s: float | None


@dataclass(frozen=True)
class VmRow:
    vm_uuid: str
    name: str = ""
    state: int = pb.VM_STATE_QUEUED
    target_host: str = ""
    predicted_total_s: float = 0.0
    predicted_downtime_ms: int = 0
    actual_total_s: float = 0.0
    actual_downtime_ms: int = 0
    attempts: int = 0
    error: str = ""
    started_at_s: float | None = None
    ended_at_s: float | None = None
    progress: Progress | None = None


@dataclass(frozen=True)
class LiveView:
    """What is known of a drain from the events seen so far."""

    host: str = ""
    drain_id: str = ""
    state: int = pb.DRAIN_STATE_PLANNING
    started_at_s: float | None = None
    finished_at_s: float | None = None
    predicted_makespan_s: float = 0.0
    planned: int = 0
    unmovable: int = 0
    rows: tuple[VmRow, ...] = ()
    notes: tuple[str, ...] = ()
    # Local clock minus coordinator clock, the smallest seen (replays only raise it).
    clock_offset_s: float | None = None
    final: pb.DrainStatus | None = None

    @property
    def finished(self) -> bool:
        return self.final is not None


def _merge_vm(row: VmRow, vm: pb.VmStatus) -> VmRow:
    return dataclasses.replace(
        row,
        name=vm.name or row.name,
        state=vm.state or row.state,
        target_host=vm.target_host or row.target_host,
        predicted_total_s=vm.predicted_total_s or row.predicted_total_s,
        predicted_downtime_ms=vm.predicted_downtime_ms or row.predicted_downtime_ms,
        actual_total_s=vm.actual_total_s or row.actual_total_s,
        actual_downtime_ms=vm.actual_downtime_ms or row.actual_downtime_ms,
        attempts=vm.attempts or row.attempts,
        error=vm.error or row.error,
    )


def _progress(p: apb.MigrationProgress) -> Progress:
    return Progress(
        phase=p.phase,
        iteration=p.iteration,
        fraction=transferred_fraction(p),
        max_downtime_ms=p.max_downtime_ms,
        max_downtime_set_by=p.max_downtime_set_by,
        expected_downtime_ms=p.downtime_ms,
        elapsed_s=p.elapsed_ms / 1000,
        sampled_at_s=timestamp_s(p.sampled_at),
    )


def _upsert(rows: tuple[VmRow, ...], row: VmRow) -> tuple[VmRow, ...]:
    for i, old in enumerate(rows):
        if old.vm_uuid == row.vm_uuid:
            return (*rows[:i], row, *rows[i + 1 :])
    return (*rows, row)


def _find(rows: tuple[VmRow, ...], vm_uuid: str) -> VmRow:
    for row in rows:
        if row.vm_uuid == vm_uuid:
            return row
    return VmRow(vm_uuid=vm_uuid)


def _note(view: LiveView, text: str) -> tuple[str, ...]:
    return (*view.notes, text)[-NOTES_KEPT:]


def apply(view: LiveView, event: pb.DrainEvent, received_s: float) -> LiveView:
    """The view after `event`, received at `received_s` on the local clock."""
    kind = event.kind
    at = timestamp_s(event.at)
    changes: dict[str, object] = {}
    if at is not None:
        offset = received_s - at
        if view.clock_offset_s is None or offset < view.clock_offset_s:
            changes["clock_offset_s"] = offset
    if event.drain_id and not view.drain_id:
        changes["drain_id"] = event.drain_id
    if event.host and not view.host:
        changes["host"] = event.host

    vm_uuid = event.vm.vm_uuid or event.vm_uuid or event.progress.domain_uuid
    rows = view.rows
    row = _find(rows, vm_uuid) if vm_uuid and kind in VM_EVENTS else None
    if row is not None and event.HasField("vm"):
        row = _merge_vm(row, event.vm)
    title = vm_title(row.name, row.vm_uuid) if row is not None else ""

    if kind == Ev.DRAIN_EVENT_KIND_STARTED:
        changes["state"] = pb.DRAIN_STATE_RUNNING
        changes["started_at_s"] = at if view.started_at_s is None else view.started_at_s
    elif kind == Ev.DRAIN_EVENT_KIND_HOST_DISABLED:
        changes["notes"] = _note(view, f"host {event.host or view.host} disabled")
    elif kind == Ev.DRAIN_EVENT_KIND_PLANNED:
        plan = event.plan
        changes["predicted_makespan_s"] = plan.predicted_makespan_s
        changes["planned"] = len(plan.migrations)
        changes["unmovable"] = len(plan.unmovable)
        if plan.notes:
            changes["notes"] = (*view.notes, *plan.notes)[-NOTES_KEPT:]
        for m in sorted(plan.migrations, key=lambda m: m.position):
            old = _find(rows, m.vm_uuid)
            rows = _upsert(
                rows,
                dataclasses.replace(
                    old,
                    name=old.name or m.name,
                    target_host=old.target_host or m.target_host,
                    predicted_total_s=m.predicted_total_s,
                    predicted_downtime_ms=m.predicted_downtime_ms,
                ),
            )
    elif kind == Ev.DRAIN_EVENT_KIND_BLOCKED:
        changes["notes"] = _note(view, f"blocked: {event.message or uuid8(vm_uuid)}")
    elif row is not None and kind == Ev.DRAIN_EVENT_KIND_MIGRATION_STARTED:
        row = dataclasses.replace(
            row, state=pb.VM_STATE_MIGRATING, started_at_s=at, progress=None, error=""
        )
    elif row is not None and kind == Ev.DRAIN_EVENT_KIND_PROGRESS:
        if event.HasField("progress"):
            row = dataclasses.replace(row, progress=_progress(event.progress))
        if row.state == pb.VM_STATE_QUEUED:
            row = dataclasses.replace(row, state=pb.VM_STATE_MIGRATING)
    elif row is not None and kind == Ev.DRAIN_EVENT_KIND_TUNED:
        what = ", ".join(event.vm.tuning_applied[-1:]) or event.message
        changes["notes"] = _note(view, f"tuned {title}: {what}")
    elif row is not None and kind == Ev.DRAIN_EVENT_KIND_MIGRATION_COMPLETED:
        row = dataclasses.replace(row, state=pb.VM_STATE_COMPLETED, ended_at_s=at)
        if row.actual_total_s <= 0 and row.progress is not None:
            row = dataclasses.replace(row, actual_total_s=row.progress.elapsed_s)
    elif row is not None and kind == Ev.DRAIN_EVENT_KIND_MIGRATION_FAILED:
        row = dataclasses.replace(row, state=pb.VM_STATE_FAILED, ended_at_s=at)
        changes["notes"] = _note(view, f"failed {title}: {row.error or event.message}")
    elif row is not None and kind == Ev.DRAIN_EVENT_KIND_RETRIED:
        row = dataclasses.replace(
            row, state=pb.VM_STATE_QUEUED, progress=None, error="", ended_at_s=None
        )
        changes["notes"] = _note(view, f"retrying {title} (attempt {row.attempts or '?'})")
    elif kind == Ev.DRAIN_EVENT_KIND_FINISHED:
        status = event.status
        changes["final"] = status
        changes["state"] = status.state
        changes["finished_at_s"] = timestamp_s(status.finished_at) or at
        for vm in status.vms:
            rows = _upsert(rows, _merge_vm(_find(rows, vm.vm_uuid), vm))
    if row is not None and kind != Ev.DRAIN_EVENT_KIND_FINISHED:
        rows = _upsert(rows, row)
    changes["rows"] = rows
    return dataclasses.replace(view, **changes)  # type: ignore[arg-type]


def _row_elapsed(row: VmRow, server_now: float) -> float | None:
    p = row.progress
    if row.state in TERMINAL_VM_STATES:
        if row.actual_total_s > 0:
            return row.actual_total_s
        if row.started_at_s is not None and row.ended_at_s is not None:
            return max(0.0, row.ended_at_s - row.started_at_s)
        return p.elapsed_s if p is not None else None
    if row.state != pb.VM_STATE_MIGRATING:
        return None
    if p is not None and p.sampled_at_s is not None:
        return p.elapsed_s + max(0.0, server_now - p.sampled_at_s)
    if row.started_at_s is not None:
        return max(0.0, server_now - row.started_at_s)
    return p.elapsed_s if p is not None else None


def _row_line(row: VmRow, server_now: float, width: int, name_width: int) -> str:
    p = row.progress
    if row.state == pb.VM_STATE_COMPLETED:
        fraction, phase = 1.0, "done"
    elif row.state == pb.VM_STATE_FAILED:
        fraction, phase = (p.fraction if p else 0.0), "failed"
    else:
        fraction = p.fraction if p else 0.0
        phase = phase_label(p.phase) if p and p.phase else "starting"
    known = p is not None or row.state == pb.VM_STATE_COMPLETED
    pct = f"{fraction * 100:3.0f}%" if known else "  -%"
    it = f"it {p.iteration:<3d}" if p is not None else "it -  "
    elapsed = f"{seconds(_row_elapsed(row, server_now))}/{prediction(row.predicted_total_s)}"
    if row.state == pb.VM_STATE_COMPLETED:
        tail = f"dt {row.actual_downtime_ms or '?'} ms (pred {row.predicted_downtime_ms or '?'})"
    elif row.state == pb.VM_STATE_FAILED:
        tail = f"error: {row.error or '?'}"
    elif p is not None and p.max_downtime_ms:
        by = f" ({p.max_downtime_set_by})" if p.max_downtime_set_by else ""
        tail = f"limit {p.max_downtime_ms} ms{by}"
    else:
        tail = "limit ?"
    name = clip(vm_title(row.name, row.vm_uuid), name_width).ljust(name_width)
    head = f"  {name} {phase:<8} "
    middle = f" {pct} {elapsed:>11} {it}"
    room = width - 1 - len(head) - 2 - len(middle) - 2 - TAIL_ROOM
    cells = max(MIN_BAR, min(MAX_BAR, room))
    return head + bar(fraction, cells) + middle + "  " + tail


def server_time(view: LiveView, now: float) -> float:
    return now - (view.clock_offset_s or 0.0)


def render_live(view: LiveView, now: float, width: int = 100, height: int = 40) -> str:
    """The frame of the live view: every line shorter than `width`, at most `height` lines."""
    width = max(40, width)
    server_now = server_time(view, now)
    done = sum(1 for r in view.rows if r.state in TERMINAL_VM_STATES)
    failed = sum(1 for r in view.rows if r.state == pb.VM_STATE_FAILED)
    migrating = sum(1 for r in view.rows if r.state == pb.VM_STATE_MIGRATING)
    queued = sum(1 for r in view.rows if r.state == pb.VM_STATE_QUEUED)
    total = max(view.planned, sum(1 for r in view.rows if r.state != pb.VM_STATE_UNMOVABLE))
    drain = f" ({view.drain_id[:8]})" if view.drain_id else ""
    head = f"drain of {view.host or '?'}{drain}: {drain_state_label(view.state)}"
    head += f"  {done}/{total} VMs done"
    extra = [f"{migrating} migrating"]
    if queued:
        extra.append(f"{queued} queued")
    if failed:
        extra.append(f"{failed} failed")
    if view.unmovable:
        extra.append(f"{view.unmovable} unmovable")
    head += " (" + ", ".join(extra) + ")"

    if view.started_at_s is None:
        elapsed: float | None = None
    else:
        end = view.finished_at_s if view.finished_at_s is not None else server_now
        elapsed = max(0.0, end - view.started_at_s)
    times = f"elapsed {seconds(elapsed)} / predicted {prediction(view.predicted_makespan_s)}"
    fraction = done / total if total else (1.0 if view.finished else 0.0)
    tail = f" {fraction * 100:3.0f}%  {times}"
    cells = max(MIN_BAR, min(2 * MAX_BAR, width - 1 - 2 - 2 - len(tail)))
    overall = "  " + bar(fraction, cells) + tail

    shown = [
        r for r in view.rows if r.state == pb.VM_STATE_MIGRATING or r.state in TERMINAL_VM_STATES
    ]
    room = max(1, height - 2 - len(view.notes) - 1)
    hidden = 0
    if len(shown) > room:
        # Keep every running migration; drop the oldest finished ones first.
        active = [r for r in shown if r.state == pb.VM_STATE_MIGRATING]
        finished = [r for r in shown if r.state != pb.VM_STATE_MIGRATING]
        keep_finished = max(0, room - len(active))
        kept = active[:room] + (finished[-keep_finished:] if keep_finished else [])
        hidden = len(shown) - len(kept)
        keep_ids = {r.vm_uuid for r in kept}
        shown = [r for r in shown if r.vm_uuid in keep_ids]
    widest = max([4, *(len(vm_title(r.name, r.vm_uuid)) for r in shown)])
    name_width = min(LIVE_NAME_WIDTH if width >= NARROW else NARROW_NAME_WIDTH, widest)
    lines = [head, overall]
    lines += [_row_line(r, server_now, width, name_width) for r in shown]
    if hidden:
        lines.append(f"  ({hidden} more finished)")
    lines += [f"  {n}" for n in view.notes]
    return "\n".join(clip(line, width - 1) for line in lines)


def redraw(previous_lines: int, frame: str) -> str:
    """ANSI text that replaces the last `previous_lines` lines drawn with `frame`."""
    prefix = f"\x1b[{previous_lines}F" if previous_lines else ""
    return prefix + "\x1b[J" + frame + "\n"


def frame_height(frame: str) -> int:
    return frame.count("\n") + 1
