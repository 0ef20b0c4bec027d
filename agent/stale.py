"""Incoming migration copies left paused on this host after their migration ended.

A destination libvirtd that dies during an incoming migration, once restarted, can keep
the incoming QEMU paused, with no job: the migration failed, the VM runs on (or went
back to) its source or moved elsewhere, and this copy holds memory and a domain name
that a later migration of the same VM here would collide with. Nobody else removes it.

The rule (``StaleIncoming``, pure) is narrow on purpose: a copy is stale when, for
``grace_s`` on end, it stayed paused for the migration, for an unknown reason or
starting up; ran no job; is transient (a copy defined here is somebody's VM); and its
vCPUs never ran the guest here (``ran_ns``). A post-copy copy is paused for another
reason (post-copy failed) and its vCPUs ran: never touched. A grace of 0 turns it off.

``IncomingSweeper`` runs the rule against the driver every ``interval_s`` and destroys
what it names. Everything it removes is logged as a warning, with the evidence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from hostmaint.agent.errors import AgentError
from hostmaint.agent.types import PausedIncoming

LOG = logging.getLogger(__name__)
# The vCPU time below which a copy's guest never ran here: an incoming QEMU's vCPU
# threads only start; a guest that ran for a moment has used more.
RAN_NS = 50_000_000


class StaleIncoming:
    """Remembers since when each paused incoming copy looked stale; names the overdue."""

    def __init__(self, grace_s: float, ran_ns: int = RAN_NS) -> None:
        self.grace_s = grace_s
        self.ran_ns = ran_ns
        self._since: dict[str, float] = {}

    def looks_stale(self, copy: PausedIncoming) -> bool:
        return not copy.job_active and not copy.persistent and copy.vcpu_time_ns < self.ran_ns

    def due(self, copies: Sequence[PausedIncoming], now: float) -> list[PausedIncoming]:
        """The copies that looked stale at every sweep for grace_s; forgets the others."""
        if self.grace_s <= 0:
            return []
        stale = [c for c in copies if self.looks_stale(c)]
        self._since = {c.domain_uuid: self._since.get(c.domain_uuid, now) for c in stale}
        return [c for c in stale if now - self._since[c.domain_uuid] >= self.grace_s]

    def forget(self, domain_uuid: str) -> None:
        self._since.pop(domain_uuid, None)


class IncomingDriver(Protocol):
    @property
    def connected(self) -> bool: ...
    def paused_incoming(self) -> list[PausedIncoming]: ...
    def discard_incoming(self, domain_uuid: str) -> None: ...


class IncomingSweeper:
    """Destroys this host's stale incoming copies, one sweep every interval_s."""

    def __init__(
        self,
        driver: IncomingDriver,
        rule: StaleIncoming,
        clock: Callable[[], float],
        wait: Callable[[float], bool],
    ) -> None:
        self._driver = driver
        self._rule = rule
        self._clock = clock
        self._wait = wait
        self.interval_s = min(10.0, max(1.0, rule.grace_s / 4))

    def sweep(self) -> list[str]:
        """One sweep: the uuids of the copies it destroyed."""
        if not self._driver.connected:
            return []
        discarded = []
        for copy in self._rule.due(self._driver.paused_incoming(), self._clock()):
            LOG.warning(
                "stale incoming copy destroyed vm=%s name=%s: paused for %.0fs or more "
                "with no job, transient, vcpu_time_ms=%.1f",
                copy.domain_uuid,
                copy.name,
                self._rule.grace_s,
                copy.vcpu_time_ns / 1e6,
            )
            try:
                self._driver.discard_incoming(copy.domain_uuid)
            except AgentError as e:  # tried again next sweep (a job libvirt still holds)
                LOG.warning("stale incoming copy not destroyed vm=%s error=%s", copy.domain_uuid, e)
                continue
            self._rule.forget(copy.domain_uuid)
            discarded.append(copy.domain_uuid)
        return discarded

    def run(self, stopped: Callable[[], bool]) -> None:
        while not stopped():
            try:
                self.sweep()
            except AgentError as e:  # libvirt away: the next sweep tries again
                LOG.warning("stale incoming sweep failed error=%s", e)
            self._wait(self.interval_s)
