"""Which queued migrations may start now (pure).

The rule the plan was simulated with, applied live: in plan order, with
backfilling, while there is a free slot on the source, the target has a free
slot, and the bandwidth the pre-copying migrations need to converge plus the
candidate's own need fits the link. The first migration always starts, so a
VM that needs the whole link still moves. Nothing starts while a migration
holds the link: one whose downtime limit was raised to the edge of the
operator's limit at its current bandwidth share, which a new start would cut
just before its switch-over (and so stretch its real downtime past the limit),
or one planned with the whole link's limit, which starts alone: a neighbour's
sending pauses and resumes, so a share is never steady enough for that limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """A queued or running migration, as dispatch sees it."""

    vm_uuid: str
    target: str | None
    need_bytes_per_s: float
    in_precopy: bool = True
    holds_link: bool = False


def ready_to_start(
    queue: Sequence[Slot],
    running: Sequence[Slot],
    *,
    max_parallel: int,
    max_parallel_per_target: int,
    link_bytes_per_s: float,
) -> list[Slot]:
    busy = list(running)
    chosen: list[Slot] = []
    for item in queue:
        if len(busy) >= max_parallel or any(b.holds_link for b in busy):
            break
        if item.holds_link and busy:
            continue  # it needs the link to itself: it starts alone
        load = sum(b.need_bytes_per_s for b in busy if b.in_precopy)
        same_target = sum(1 for b in busy if item.target is not None and b.target == item.target)
        if busy and (
            load + item.need_bytes_per_s > link_bytes_per_s
            or same_target >= max_parallel_per_target
        ):
            continue
        busy.append(item)
        chosen.append(item)
    return chosen
