"""Pure decisions of the agent's migration tuning: values in, decisions out."""

from __future__ import annotations

from dataclasses import dataclass

# QEMU refuses a downtime limit above 2000 s.
QEMU_MAX_DOWNTIME_MS = 2_000_000
SET_BY_HOSTMAINT = "hostmaint"
SET_BY_EXTERNAL = "external"


@dataclass(frozen=True)
class DowntimeDecision:
    apply: bool
    value_ms: int
    refused: str = ""


def decide_max_downtime(
    current_ms: int, requested_ms: int, lower: bool = False
) -> DowntimeDecision:
    """Raise only, unless ``lower``: a request below the limit in force is refused, equal
    is a no-op."""
    if requested_ms <= 0:
        return DowntimeDecision(False, current_ms, "max downtime must be positive")
    if requested_ms > QEMU_MAX_DOWNTIME_MS:
        return DowntimeDecision(
            False, current_ms, f"max downtime above QEMU's limit of {QEMU_MAX_DOWNTIME_MS} ms"
        )
    if requested_ms < current_ms and not lower:
        return DowntimeDecision(
            False,
            current_ms,
            f"max downtime is {current_ms} ms already; it is lowered only with "
            f"lower_max_downtime (asked {requested_ms})",
        )
    return DowntimeDecision(requested_ms != current_ms, requested_ms)


def reassert_downtime(current_ms: int, floor_ms: int | None) -> int | None:
    """The value to set again when someone lowered the limit below ours, else None.

    nova-compute's monitor sets its own downtime step after step; a floor the
    agent was asked to hold wins over a lower step.
    """
    if floor_ms is None or current_ms >= floor_ms:
        return None
    return floor_ms


def downtime_set_by(current_ms: int, ours_ms: int | None) -> str:
    return SET_BY_HOSTMAINT if ours_ms is not None and current_ms == ours_ms else SET_BY_EXTERNAL


def vcpu_quota_pct(throttle_pct: int) -> int:
    """A throttle of N% leaves each vCPU (100 - N)% of a core; 0 lifts the cap."""
    if not 0 <= throttle_pct <= 99:
        raise ValueError("vcpu throttle must be between 0 and 99 percent")
    return 100 - throttle_pct
