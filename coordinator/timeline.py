"""A drain as a timeline: per VM plan against actual, rounds, tuning, bursts; the link's use.

Pure: a `DrainHistory` (status, journal steps, kept events) in, a `Timeline`
out, every time in seconds from the drain's start. The plan's times count
from its first migration's start, so its bars are placed from the moment the
first migration really started.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from dataclasses import dataclass, field

from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb

LINK_BINS = 240  # the link chart's resolution, over the whole drain


@dataclass(frozen=True)
class Mark:
    at_s: float
    kind: str  # round, postcopy, tune, abort, retry, switchover
    label: str


@dataclass(frozen=True)
class Lane:
    vm_uuid: str
    name: str
    target: str
    state: str
    planned: tuple[float, float] | None
    actual: tuple[float, float] | None
    predicted_downtime_ms: float
    actual_downtime_ms: float
    tuning: str
    tuning_applied: tuple[str, ...]
    attempts: int
    error: str
    marks: tuple[Mark, ...] = ()
    bursts: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Timeline:
    drain_id: str
    host: str
    state: str
    started_at: float  # seconds since the epoch
    span_s: float
    predicted_makespan_s: float
    actual_makespan_s: float
    link_bytes_per_s: float
    lanes: tuple[Lane, ...]
    # (bin start, bytes/s summed over the migrations sending then)
    link: tuple[tuple[float, float], ...] = ()
    summary: dict[str, str] = field(default_factory=dict)


def _s(ts: object) -> float | None:
    """A Timestamp as seconds since the epoch; None when unset."""
    seconds = getattr(ts, "seconds", 0)
    nanos = getattr(ts, "nanos", 0)
    if not seconds and not nanos:
        return None
    return float(seconds) + float(nanos) / 1e9


def _name(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix).lower()


def build(history: cpb.DrainHistory) -> Timeline:
    status = history.status
    t0 = _s(status.started_at) or 0.0

    def rel(at: float) -> float:
        return max(0.0, at - t0)

    starts = [
        a for s in history.steps if s.action == "start_migration" and (a := _s(s.at)) is not None
    ]
    plan_zero = rel(min(starts)) if starts else 0.0
    planned = {
        m.vm_uuid: (plan_zero + m.start_s, plan_zero + m.start_s + m.predicted_total_s)
        for m in status.plan.migrations
    }
    marks: dict[str, list[Mark]] = defaultdict(list)
    bursts: dict[str, list[tuple[float, float]]] = defaultdict(list)
    first_start: dict[str, float] = {}
    holding: dict[str, float] = {}
    for step in history.steps:
        at = _s(step.at)
        if at is None or not step.vm_uuid:
            continue
        detail = json.loads(step.detail_json or "{}")
        if step.action == "start_migration":
            first_start.setdefault(step.vm_uuid, rel(at))
        elif step.action == "tune":
            label = str(detail.get("action", "tune"))
            failed = " (failed)" if step.state == "failed" else ""
            marks[step.vm_uuid].append(Mark(rel(at), "tune", label + failed))
            if label.startswith("hold_link") and not failed:
                holding[step.vm_uuid] = rel(at)
            elif label.startswith("release_link") and step.vm_uuid in holding:
                bursts[step.vm_uuid].append((holding.pop(step.vm_uuid), rel(at)))
        elif step.action == "abort":
            marks[step.vm_uuid].append(Mark(rel(at), "abort", str(detail.get("reason", ""))))

    link_samples: list[tuple[float, str, float]] = []
    rounds: dict[str, int] = {}
    postcopy: set[str] = set()
    last_event = 0.0
    for event in history.events:
        at = _s(event.at)
        if at is None:
            continue
        last_event = max(last_event, rel(at))
        if event.kind == cpb.DRAIN_EVENT_KIND_RETRIED:
            marks[event.vm_uuid].append(Mark(rel(at), "retry", event.message))
        if event.kind != cpb.DRAIN_EVENT_KIND_PROGRESS or not event.HasField("progress"):
            continue
        p = event.progress
        uuid = event.vm_uuid
        if p.iteration > rounds.get(uuid, 0):
            rounds[uuid] = p.iteration
            marks[uuid].append(Mark(rel(at), "round", f"round {p.iteration}"))
        if p.phase == apb.MIGRATION_PHASE_POSTCOPY and uuid not in postcopy:
            postcopy.add(uuid)
            marks[uuid].append(Mark(rel(at), "postcopy", "post-copy"))
        link_samples.append((rel(at), uuid, 0.0 if p.final else p.bandwidth_bytes_per_s))

    lanes = []
    ends = [last_event]
    for vm in status.vms:
        start, end = _s(vm.started_at), _s(vm.finished_at)
        actual = None
        if start is not None or vm.vm_uuid in first_start:
            a = rel(start) if start is not None else first_start[vm.vm_uuid]
            b = rel(end) if end is not None else max(a, last_event)
            actual = (a, b)
            ends.append(b)
            if vm.state == cpb.VM_STATE_COMPLETED:
                marks[vm.vm_uuid].append(
                    Mark(b, "switchover", f"switch-over: {vm.actual_downtime_ms} ms down")
                )
        for holder, since in list(holding.items()):
            if holder == vm.vm_uuid:
                bursts[holder].append((since, actual[1] if actual else since))
        lanes.append(
            Lane(
                vm_uuid=vm.vm_uuid,
                name=vm.name or vm.vm_uuid[:8],
                target=vm.target_host,
                state=_name(cpb.VmState.Name(vm.state), "VM_STATE_"),
                planned=planned.get(vm.vm_uuid),
                actual=actual,
                predicted_downtime_ms=float(vm.predicted_downtime_ms),
                actual_downtime_ms=float(vm.actual_downtime_ms),
                tuning=_name(cpb.Tuning.Name(vm.tuning), "TUNING_"),
                tuning_applied=tuple(vm.tuning_applied),
                attempts=vm.attempts,
                error=vm.error,
                marks=tuple(sorted(marks.get(vm.vm_uuid, []), key=lambda m: m.at_s)),
                bursts=tuple(bursts.get(vm.vm_uuid, [])),
            )
        )
    finished = _s(status.finished_at)
    if finished is not None:
        ends.append(rel(finished))
    ends.extend(p[1] for p in planned.values())
    span = max(ends, default=0.0) or 1.0
    summary = status.summary
    return Timeline(
        drain_id=status.drain_id,
        host=status.host,
        state=_name(cpb.DrainState.Name(status.state), "DRAIN_STATE_"),
        started_at=t0,
        span_s=span,
        predicted_makespan_s=summary.predicted_makespan_s,
        actual_makespan_s=summary.actual_makespan_s,
        link_bytes_per_s=status.plan.link_bandwidth_bytes_per_s,
        lanes=tuple(lanes),
        link=link_use(link_samples, span),
        summary={
            "migrated": str(summary.migrated),
            "failed": str(summary.failed),
            "unmovable": str(summary.unmovable),
            "post-copy used": str(summary.postcopy_used),
            "max downtime": f"{summary.max_downtime_ms} ms",
        },
    )


def link_use(
    samples: list[tuple[float, str, float]], span_s: float, bins: int = LINK_BINS
) -> tuple[tuple[float, float], ...]:
    """The link's use over time: at each bin's middle, the bandwidth each migration had at
    its last sample before, summed. A sample holds until the migration's next one; its
    last holds no further (a final sample reads 0).
    """
    if not samples:
        return ()
    width = span_s / bins
    by_vm: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for at, uuid, bandwidth in sorted(samples):
        by_vm[uuid].append((at, bandwidth))
    out = []
    for i in range(bins):
        middle = (i + 0.5) * width
        used = 0.0
        for series in by_vm.values():
            k = bisect.bisect_right(series, (middle, float("inf"))) - 1
            if 0 <= k < len(series) - 1:
                used += series[k][1]
        out.append((i * width, used))
    return tuple(out)
