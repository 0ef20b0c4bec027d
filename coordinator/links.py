"""A drain's link arbiter: which migration holds the source's link for its switch-over.

A burst (the ladder's HOLD_LINK) caps the drain's other running migrations to a
trickle through the source agent, then raises the holder's downtime limit to the
whole link's. It always gives their bandwidth back: at its release, when the
holder's watcher ends, when a held-back neighbour sees it overrun, and after a
restart: a burst the previous coordinator left goes on in force (`resume`) until its
holder's ladder releases it, or is undone at once (`reset_after_restart`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from hostmaint.coordinator import errors, escalation
from hostmaint.coordinator.planner import HELD_BACK_BYTES_PER_S, MAX_BURST_S
from hostmaint.protos import agent_pb2 as apb

LOG = logging.getLogger(__name__)
# How an agent refuses to tune a migration that has ended: the domain left, or no job runs.
_ENDED_CODES = frozenset({"NOT_FOUND", "FAILED_PRECONDITION"})


class Tuner(Protocol):
    """The source agent's TuneMigration (`agents.AgentClient`)."""

    def tune(self, request: apb.TuneMigrationRequest) -> apb.TuneMigrationResponse: ...


@dataclass(frozen=True)
class Burst:
    """A migration holding the link for its switch-over, and those it holds back."""

    holder: str
    started: float
    restore_ms: int  # the holder's limit before it
    held: dict[str, int] = field(default_factory=dict)  # VM -> its cap to restore (0: none)


class LinkArbiter:
    """One burst at a time on a drain's link.

    `agent`: the source agent; `running`: the drain's running migrations (VM UUIDs);
    `planned_cap`: a VM's planned bandwidth cap (0: none), given back where the agent
    does not say what it replaced; a burst older than `overrun_s` is released by the
    first held-back neighbour that looks.
    """

    def __init__(
        self,
        agent: Callable[[], Tuner],
        clock: Callable[[], float],
        running: Callable[[], Collection[str]],
        planned_cap: Callable[[str], int],
        overrun_s: float = MAX_BURST_S,
    ) -> None:
        self._agent = agent
        self._clock = clock
        self._running = running
        self._planned_cap = planned_cap
        self._overrun_s = overrun_s
        self._lock = threading.Lock()
        self._burst: Burst | None = None

    @property
    def burst(self) -> Burst | None:
        """The burst in progress, if any."""
        return self._burst

    def holds(self, vm_uuid: str) -> bool:
        burst = self._burst
        return burst is not None and burst.holder == vm_uuid

    def hold(self, holder: str, limit_ms: int, restore_ms: int) -> None:
        """Caps every other running migration of the drain to a trickle, then raises the
        holder's limit to the whole link's; any refusal undoes what was done (the holder's
        limit is raised only once nothing else sends). Each is given back the cap the agent
        says it replaced (one Nova or an operator set included); the plan's where the
        agent does not say."""
        with self._lock:
            if self._burst is not None:
                raise errors.PreconditionFailed("hold the link", f"{self._burst.holder} holds it")
            burst = self._burst = Burst(holder, self._clock(), restore_ms)
        others = sorted(set(self._running()) - {holder})
        agent = self._agent()
        try:
            for vm in others:
                answer = agent.tune(
                    apb.TuneMigrationRequest(
                        domain_uuid=vm, bandwidth_bytes_per_s=round(HELD_BACK_BYTES_PER_S)
                    )
                )
                burst.held[vm] = (
                    answer.previous_bandwidth_bytes_per_s
                    if answer.HasField("previous_bandwidth_bytes_per_s")
                    else self._planned_cap(vm)
                )
            agent.tune(apb.TuneMigrationRequest(domain_uuid=holder, max_downtime_ms=limit_ms))
        except errors.CoordinatorError:
            self.end(holder)
            raise

    def release(self, holder: str, restore_ms: int) -> None:
        """The holder's limit back to its share's first, then the others' bandwidth."""
        try:
            self._agent().tune(
                apb.TuneMigrationRequest(
                    domain_uuid=holder, max_downtime_ms=restore_ms, lower_max_downtime=True
                )
            )
        finally:
            self.end(holder)

    def end(self, holder: str) -> None:
        """Gives the link back to the migrations a burst of ``holder`` holds back."""
        with self._lock:
            burst = self._burst
            if burst is None or burst.holder != holder:
                return
            self._burst = None
        agent = self._agent()
        for vm, cap in burst.held.items():
            try:
                agent.tune(apb.TuneMigrationRequest(domain_uuid=vm, bandwidth_bytes_per_s=cap))
            except errors.CoordinatorError as e:
                if isinstance(e, errors.AgentRefused) and e.code in _ENDED_CODES:
                    # its migration ended during the burst: nothing left to give back
                    LOG.info("migration ended during a burst vm=%s", vm)
                else:  # the agent is away
                    LOG.warning("bandwidth not restored after a burst vm=%s error=%s", vm, e)
        LOG.info("link released holder=%s held=%d", holder, len(burst.held))

    def held_back(self, vm_uuid: str) -> bool:
        """Another migration holds the link; one that holds it far past any burst (its
        watcher lost) gives it back."""
        burst = self._burst
        if burst is None or burst.holder == vm_uuid:
            return False
        if self._clock() - burst.started > self._overrun_s:
            LOG.warning("burst overran, releasing the link holder=%s", burst.holder)
            try:
                self.release(burst.holder, burst.restore_ms)
            except errors.CoordinatorError as e:
                LOG.warning("holder's limit not restored vm=%s error=%s", burst.holder, e)
            return False
        return True

    def resume(self, holder: str, started: float, restore_ms: int, held: Collection[str]) -> None:
        """A burst the previous coordinator left in force, taken over as it stands: nothing
        is tuned now (the neighbours' caps and the holder's limit hold on their jobs); its
        release restores the holder's limit to `restore_ms` and gives each of `held` its
        planned cap (what each had before is not journaled)."""
        with self._lock:
            if self._burst is not None:
                raise errors.PreconditionFailed("hold the link", f"{self._burst.holder} holds it")
            caps = {vm: self._planned_cap(vm) for vm in held if vm != holder}
            self._burst = Burst(holder, started, restore_ms, caps)
        LOG.info("burst resumed after a restart holder=%s held=%d", holder, len(caps))

    def reset_after_restart(
        self,
        vm_uuid: str,
        done: escalation.Escalation,
        *,
        elapsed_s: float,
        planned_limit_ms: int,
    ) -> escalation.Escalation:
        """A burst the previous coordinator left: an adopted migration gets its planned
        bandwidth back, and one that held the link the limit it had before (the plan's,
        `planned_limit_ms`, where the journal does not say); its ladder then stands as
        after a release, `elapsed_s` into the migration."""
        request = apb.TuneMigrationRequest(
            domain_uuid=vm_uuid, bandwidth_bytes_per_s=self._planned_cap(vm_uuid)
        )
        restore_ms = done.restore_ms or planned_limit_ms
        if done.holding and restore_ms:
            request.max_downtime_ms = restore_ms
            request.lower_max_downtime = True
        try:
            self._agent().tune(request)
        except errors.CoordinatorError as e:
            if isinstance(e, errors.AgentRefused) and e.code in _ENDED_CODES:
                # Race: the migration ended between the restart's check and this call (the
                # domain left the source, or no job runs); its watcher records its end.
                LOG.info("migration ended before its reset after a restart vm=%s", vm_uuid)
            else:  # the agent is away: its watcher finds out
                LOG.warning("cannot reset the migration after a restart vm=%s error=%s", vm_uuid, e)
        if not done.holding:
            return done
        release = escalation.Decision(escalation.Action.RELEASE_LINK, restore_ms)
        return escalation.applied(done, release, elapsed_s)
