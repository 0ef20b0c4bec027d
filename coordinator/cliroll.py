"""The CLI's views of a roll: its plan, its status, one line per event, the live table.

Pure: values in, strings out, no I/O and no clock.
"""

from __future__ import annotations

from hostmaint.coordinator.cliformat import clip, clock_text, prediction, seconds, table
from hostmaint.protos import coordinator_pb2 as pb

RIGHT = frozenset({2, 3})


def roll_state_label(value: int) -> str:
    return pb.RollState.Name(value).removeprefix("ROLL_STATE_").lower()  # type: ignore[arg-type]


def host_state_label(value: int) -> str:
    name = pb.RollHostState.Name(value)  # type: ignore[arg-type]
    return name.removeprefix("ROLL_HOST_STATE_").lower().replace("_", " ")


def event_label(value: int) -> str:
    name = pb.RollEventKind.Name(value)  # type: ignore[arg-type]
    return name.removeprefix("ROLL_EVENT_KIND_").lower().replace("_", " ")


def render_roll_plan(plan: pb.RollPlan) -> str:
    """Waves, each host's VMs with their targets, the predictions."""
    moves = sum(len(h.moves) for w in plan.waves for h in w.hosts)
    lines = [
        f"roll of {sum(len(w.hosts) for w in plan.waves)} hosts in {len(plan.waves)} waves: "
        f"{plan.vm_count} VMs, {moves} moves ({plan.moves_per_vm:.2f} per VM), "
        f"predicted {prediction(plan.predicted_s)}"
        + (
            f" with {seconds(plan.maintenance_s)} maintenance per wave"
            if plan.maintenance_s
            else ""
        ),
        f"fullest host: memory {plan.memory_fill_peak:.0%}, vCPUs {plan.vcpu_fill_peak:.0%}",
    ]
    for w in plan.waves:
        lines.append("")
        lines.append(
            f"wave {w.index}: {', '.join(h.host for h in w.hosts)}  "
            f"drain {prediction(w.predicted_drain_s)}, wave {prediction(w.predicted_s)}"
        )
        rows = [
            [h.host, m.vm_name or m.vm_uuid[:8], m.target_host, str(m.nth)]
            for h in w.hosts
            for m in h.moves
        ]
        if rows:
            lines.append(
                table(
                    ["  HOST", "VM", "TARGET", "MOVE"],
                    [["  " + r[0], *r[1:]] for r in rows],
                    frozenset({3}),
                )
            )
        else:
            lines.append("  (no VMs)")
    for p in plan.parked:
        lines.append(
            f"parked: {p.vm_name or p.vm_uuid[:8]} waits on {p.target_host} (wave {p.wave}), "
            f"moves again: {p.reason}"
        )
    return "\n".join(lines)


def render_roll_status(status: pb.RollStatus) -> str:
    head = f"roll {status.roll_id}: {roll_state_label(status.state)}"
    if status.current_wave:
        head += f", wave {status.current_wave} of {len(status.plan.waves)}"
    if status.hook:
        head += f", hook {status.hook!r}"
    rows = []
    for h in status.hosts:
        rows.append(
            [
                h.host,
                host_state_label(h.state),
                str(h.wave),
                prediction(h.predicted_s),
                h.step or "-",
                h.versions_after or h.versions_before or "-",
                h.error or "",
            ]
        )
    lines = [
        head,
        table(["HOST", "STATE", "WAVE", "PREDICTED", "STEP", "VERSIONS", "WHY"], rows, RIGHT),
    ]
    if status.message:
        lines.append(status.message)
    if status.state == pb.ROLL_STATE_STOPPED:
        lines.append(
            f"resume with: hostmaint roll-resume {status.roll_id} [--skip HOST | --hook-done]"
        )
    return "\n".join(lines)


def render_roll_event_line(event: pb.RollEvent) -> str:
    parts = [clock_text(event.at), event_label(event.kind)]
    if event.wave:
        parts.append(f"wave {event.wave}")
    if event.host:
        parts.append(event.host)
    if event.drain_id:
        parts.append(f"drain {event.drain_id[:8]}")
    if event.kind == pb.ROLL_EVENT_KIND_PLANNED:
        parts.append(
            f"{len(event.plan.waves)} waves, {event.plan.vm_count} VMs, "
            f"predicted {prediction(event.plan.predicted_s)}"
        )
    if event.message:
        parts.append(event.message)
    return "  ".join(parts)


def render_roll_live(
    status_rows: dict[str, tuple[int, str, str]], last: list[str], width: int
) -> str:
    """The live table: each host's wave, state and latest word, then the latest events."""
    rows = [[host, str(wave), state, note] for host, (wave, state, note) in status_rows.items()]
    frame = table(["HOST", "WAVE", "STATE", "LAST"], rows, frozenset({1}))
    lines = [*frame.split("\n"), "", *last]
    return "\n".join(clip(line, width - 1) for line in lines)
