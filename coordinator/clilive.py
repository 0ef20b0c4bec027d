"""The live view of a drain: folded from its events (`apply`), drawn as a frame (`render_live`).

Pure: no I/O and no clock; whoever draws passes `now` (seconds since the epoch,
the local clock) and the terminal size. On a terminal the caller redraws the
frame in place (`redraw`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hostmaint.coordinator.cliformat import (
    bar,
    clip,
    drain_state_label,
    phase_label,
    prediction,
    seconds,
    timestamp_s,
    transferred_fraction,
    uuid8,
    vm_title,
)
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as pb

NOTES_KEPT = 4
MIN_BAR = 6
MAX_BAR = 40
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
        Ev.DRAIN_EVENT_KIND_POSTCOPY_PAUSED,
        Ev.DRAIN_EVENT_KIND_POSTCOPY_RESUMED,
        Ev.DRAIN_EVENT_KIND_STRANDED,
    }
)
TERMINAL_VM_STATES = frozenset({pb.VM_STATE_COMPLETED, pb.VM_STATE_FAILED, pb.VM_STATE_STRANDED})
IN_FLIGHT_VM_STATES = frozenset({pb.VM_STATE_MIGRATING, pb.VM_STATE_POSTCOPY_PAUSED})


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
    revised_total_s: float = 0.0
    revised_note: str = ""


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
        revised_total_s=vm.revised_total_s if vm.revised_note else row.revised_total_s,
        revised_note=vm.revised_note or row.revised_note,
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
    elif row is not None and kind == Ev.DRAIN_EVENT_KIND_POSTCOPY_PAUSED:
        row = dataclasses.replace(row, state=pb.VM_STATE_POSTCOPY_PAUSED)
        changes["notes"] = _note(view, f"PAUSED {title}: {event.message}")
    elif row is not None and kind == Ev.DRAIN_EVENT_KIND_POSTCOPY_RESUMED:
        row = dataclasses.replace(row, state=pb.VM_STATE_MIGRATING, error="")
        changes["notes"] = _note(view, f"resumed {title}: {event.message}")
    elif row is not None and kind == Ev.DRAIN_EVENT_KIND_STRANDED:
        row = dataclasses.replace(row, state=pb.VM_STATE_STRANDED, ended_at_s=at)
        changes["notes"] = _note(view, f"STRANDED {title}: {event.message}")
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
    if row.state not in IN_FLIGHT_VM_STATES:
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
    elif row.state == pb.VM_STATE_STRANDED:
        fraction, phase = (p.fraction if p else 0.0), "STRANDED"
    elif row.state == pb.VM_STATE_POSTCOPY_PAUSED:
        fraction, phase = (p.fraction if p else 0.0), "POSTCOPY-PAUSED"
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
    if row.revised_note and row.state not in TERMINAL_VM_STATES:
        revised = seconds(row.revised_total_s) if row.revised_total_s > 0 else "never"
        tail = f"rev {revised}, {tail}"
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
    paused = sum(1 for r in view.rows if r.state == pb.VM_STATE_POSTCOPY_PAUSED)
    stranded = sum(1 for r in view.rows if r.state == pb.VM_STATE_STRANDED)
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
    if paused:
        extra.append(f"{paused} POST-COPY PAUSED")
    if stranded:
        extra.append(f"{stranded} STRANDED")
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
        r for r in view.rows if r.state in IN_FLIGHT_VM_STATES or r.state in TERMINAL_VM_STATES
    ]
    room = max(1, height - 2 - len(view.notes) - 1)
    hidden = 0
    if len(shown) > room:
        # Keep every running migration; drop the oldest finished ones first.
        active = [r for r in shown if r.state in IN_FLIGHT_VM_STATES]
        finished = [r for r in shown if r.state not in IN_FLIGHT_VM_STATES]
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
