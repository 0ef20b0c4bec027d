"""The CLI's small text helpers: widths, durations, bars, labels and tables.

Pure: values in, strings out, no I/O and no clock. Shared by the static views
(`cliview`) and the live view of a drain (`clilive`).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from google.protobuf import timestamp_pb2

from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as pb

ELLIPSIS = "…"


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


def transferred_fraction(p: apb.MigrationProgress) -> float:
    """Share of the guest's memory already on the target (1 - remaining / total)."""
    if p.phase == apb.MIGRATION_PHASE_COMPLETED:
        return 1.0
    if not p.memory_total_bytes:
        return 0.0
    done = p.memory_total_bytes - min(p.memory_remaining_bytes, p.memory_total_bytes)
    return done / p.memory_total_bytes
