"""Which queued migrations may start now (pure).

The rule the plan was simulated with, applied live: in plan order, with
backfilling, while there is a free slot on the source, the target has a free
slot, and, with the candidate started, every pre-copying migration (the
candidate too) still gets the bandwidth it needs to converge from its fair
share of the link. Pre-copy sends as fast as it can, so migrations that
share a link split it evenly, whatever each needs: a writer whose need is
above its share does not converge beside the others, it resends its dirty
pages until they leave, and takes from them the bandwidth they converge on
(that the needs merely add up to less than the link is not enough). The first
migration always starts, so a VM that needs the whole link still moves.
Nothing starts while a migration holds the link: one whose downtime limit was
raised to the edge of the operator's limit at its current bandwidth share,
which a new start would cut just before its switch-over (and so stretch its
real downtime past the limit), or one planned with the whole link's limit,
which starts alone: a neighbour's sending pauses and resumes, so a share is
never steady enough for that limit.
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
        share = link_bytes_per_s / (len(busy) + 1)  # every running migration sends
        need = max([item.need_bytes_per_s] + [b.need_bytes_per_s for b in busy if b.in_precopy])
        same_target = sum(1 for b in busy if item.target is not None and b.target == item.target)
        if busy and (need > share or same_target >= max_parallel_per_target):
            continue
        busy.append(item)
        chosen.append(item)
    return chosen
