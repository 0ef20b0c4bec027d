"""A drain's history becomes its timeline: bars, rounds, tuning, bursts, the link's use."""

from __future__ import annotations

import json
import re

from google.protobuf.timestamp_pb2 import Timestamp

from hostmaint.coordinator import report, timeline
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb

T0 = 1_000_000.0
VM = "00000000-0000-4000-8000-000000000001"


def ts(offset_s: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int((T0 + offset_s) * 1e9))
    return t


def step(kind: str, at: float, **detail: object) -> cpb.JournalStep:
    return cpb.JournalStep(
        vm_uuid=VM, action=kind, detail_json=json.dumps(detail), state="done", at=ts(at)
    )


def progress(at: float, iteration: int, bandwidth: float, **kw: object) -> cpb.DrainEvent:
    return cpb.DrainEvent(
        kind=cpb.DRAIN_EVENT_KIND_PROGRESS,
        vm_uuid=VM,
        at=ts(at),
        progress=apb.MigrationProgress(iteration=iteration, bandwidth_bytes_per_s=bandwidth, **kw),
    )


def history() -> cpb.DrainHistory:
    plan = cpb.DrainPlan(
        link_bandwidth_bytes_per_s=100.0,
        migrations=[cpb.PlannedMigration(vm_uuid=VM, start_s=0.0, predicted_total_s=8.0)],
    )
    status = cpb.DrainStatus(
        drain_id="d",
        host="h",
        state=cpb.DRAIN_STATE_COMPLETED,
        started_at=ts(0),
        finished_at=ts(12),
        plan=plan,
        vms=[
            cpb.VmStatus(
                vm_uuid=VM,
                name="web",
                state=cpb.VM_STATE_COMPLETED,
                actual_downtime_ms=420,
                started_at=ts(2),
                finished_at=ts(11),
            )
        ],
    )
    steps = [
        step("start_migration", 2),
        step("tune", 6, action="hold_link=900"),
        step("tune", 8, action="release_link"),
    ]
    events = [
        progress(3, 1, 80.0),
        progress(5, 2, 90.0),
        progress(9, 3, 50.0, phase=apb.MIGRATION_PHASE_POSTCOPY),
        progress(11, 3, 0.0, final=True),
    ]
    return cpb.DrainHistory(status=status, steps=steps, events=events)


def test_plan_and_actual_are_placed_from_the_first_start() -> None:
    t = timeline.build(history())
    (lane,) = t.lanes
    assert lane.planned == (2.0, 10.0)
    assert lane.actual == (2.0, 11.0)
    assert t.span_s == 12.0


def test_rounds_tuning_bursts_postcopy_and_switchover_are_marked() -> None:
    (lane,) = timeline.build(history()).lanes
    kinds = [(m.kind, m.at_s) for m in lane.marks]
    assert ("round", 3.0) in kinds and ("round", 5.0) in kinds and ("round", 9.0) in kinds
    assert ("tune", 6.0) in kinds and ("postcopy", 9.0) in kinds
    assert ("switchover", 11.0) in kinds
    assert lane.bursts == ((6.0, 8.0),)


def test_the_link_carries_each_sample_until_the_next() -> None:
    t = timeline.build(history())
    at = dict(t.link)
    width = t.span_s / timeline.LINK_BINS
    use = {round(a / width): u for a, u in at.items()}
    assert use[round(4 / width)] == 80.0
    assert use[round(6 / width)] == 90.0
    assert use[round(10 / width)] == 50.0
    assert use[round(11.5 / width)] == 0.0


def test_the_page_draws_them() -> None:
    page = report.render(timeline.build(history()))
    assert page.count('class="bar planned"') == 1
    assert page.count('class="bar actual completed"') == 1
    assert page.count('class="round"') == 3
    assert page.count('class="burst"') == 1
    assert '<polyline class="link"' in page


def test_every_axis_label_is_inside_its_chart() -> None:
    page = report.render(timeline.build(history()))
    labels = re.findall(
        r'<text x="([\d.]+)" y="[\d.]+"( text-anchor="end")?>([\d.]+) s</text>', page
    )
    assert {label for _, _, label in labels} >= {"0", "12"}
    assert any(end for _, end, _ in labels)  # the last one, at the right edge
    for x, end, _ in labels:
        right = float(x) + (0 if end else 30)  # a label such as "12 s" is under 30 px wide
        assert right <= report.WIDTH, (x, end)
