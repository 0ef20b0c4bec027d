"""What becomes of a VM that cannot move live because of its state.

The policy's `non_live_action`: REPORT leaves it in place with the reason;
COLD_MIGRATE cold-migrates it through a driver that can (Nova; the libvirt driver
cannot, and it is reported as before), once the live migrations are done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hostmaint.coordinator.drivers.base import InstanceState
from hostmaint.coordinator.journal import VmRow
from hostmaint.coordinator.model import TargetHost
from hostmaint.protos import coordinator_pb2 as cpb

# The journal row's `tuning` of a VM moved by a cold migration (not a model Tuning).
COLD = "cold"
# The states in which a VM may be cold-migrated instead of live-migrated.
COLD_STATES = frozenset({InstanceState.SHUTOFF, InstanceState.PAUSED, InstanceState.SUSPENDED})


@dataclass(frozen=True)
class NonLive:
    """A VM that cannot move live: cold-migrate it (to `target`, None: the scheduler's
    choice) or leave it in place, and why."""

    cold: bool
    target: str | None
    reason: str


def is_cold(row: VmRow) -> bool:
    """The VM is (to be) moved by a cold migration."""
    return row.tuning == COLD


def non_live(
    state: InstanceState,
    policy_pb: cpb.DrainPolicy,
    targets: Sequence[TargetHost],
    *,
    can_cold_migrate: bool,
) -> NonLive:
    """What becomes of a VM in `state`, which cannot move live.

    A target only when the operator restricted the targets (the allowed healthy host
    with the most free memory); otherwise the cloud's scheduler chooses, checking
    capacity and server groups itself.
    """
    if policy_pb.non_live_action != cpb.NON_LIVE_ACTION_COLD_MIGRATE:
        return NonLive(
            False, None, f"the VM is {state}: not live-migratable; left in place (policy: report)"
        )
    if not can_cold_migrate:
        return NonLive(
            False,
            None,
            f"the VM is {state}: not live-migratable, and this driver cannot cold-migrate; "
            "left in place",
        )
    if state not in COLD_STATES:
        return NonLive(
            False, None, f"the VM is {state}: it cannot be migrated in this state; left in place"
        )
    target = None
    if policy_pb.target_hosts:
        healthy = [t for t in targets if t.healthy]
        if not healthy:
            return NonLive(
                False,
                None,
                f"the VM is {state}: no allowed target is available for a cold migration; "
                "left in place",
            )
        target = max(healthy, key=lambda t: t.free_memory_bytes).name
    where = target or "a host of the scheduler's choice"
    return NonLive(
        True,
        target,
        f"the VM is {state}: to be cold-migrated to {where} once the live migrations "
        "are done (policy: cold migrate)",
    )
