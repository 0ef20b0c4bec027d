"""A drain's event stream: the bus its followers read, and the events published on it.

``EventBus`` serves a roll's events too (``rollrun``): it keeps any message type."""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from hostmaint.coordinator import views
from hostmaint.coordinator.journal import Journal, VmRow
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb

LOG = logging.getLogger(__name__)
_EVENTS_HEAD = 10
_EVENTS_KEPT = 5000
E = TypeVar("E")


class EventBus(Generic[E]):
    """A drain's (or a roll's) events, kept so a client that re-attaches sees them from the start.

    Each event has an absolute position in the drain's stream. The first
    `_EVENTS_HEAD` (started, host disabled, planned...) are kept for good, the
    newest `_EVENTS_KEPT` in a window that slides; a follower reads by absolute
    position, so one that keeps up receives every event up to FINISHED however
    many were published, and one that re-attaches late receives the head, then
    the window.
    """

    def __init__(self, kept: int = _EVENTS_KEPT) -> None:
        self._head: list[E] = []
        self._tail: collections.deque[E] = collections.deque(maxlen=kept)
        self._published = 0  # events ever published: the next one's position
        self._closed = False
        self._cond = threading.Condition()

    def publish(self, event: E) -> None:
        with self._cond:
            if self._published < _EVENTS_HEAD:
                self._head.append(event)
            else:
                self._tail.append(event)
            self._published += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _since(self, position: int) -> list[E]:
        """The kept events from `position` on (the window's oldest if it slid past)."""
        batch = self._head[position:]
        first_in_tail = self._published - len(self._tail)
        skip = max(0, position - first_in_tail)
        batch.extend(itertools.islice(self._tail, skip, None))
        return batch

    def follow(self, stopped: Callable[[], bool]) -> Iterator[E]:
        position = 0
        while True:
            with self._cond:
                while position >= self._published and not self._closed and not stopped():
                    self._cond.wait(0.5)
                batch = self._since(position)
                position = self._published
                closed = self._closed
            yield from batch
            if (closed and not batch) or stopped():
                return


class Events:
    """Builds a drain's events (stamped by `clock`, a drain's status from the journal)."""

    def __init__(self, journal: Journal, clock: Callable[[], float]) -> None:
        self._journal = journal
        self._clock = clock

    def status(self, drain_id: str) -> cpb.DrainStatus:
        drain = self._journal.drain(drain_id)
        return views.status_to_pb(drain, self._journal.vms(drain_id))

    def event(
        self,
        drain_id: str,
        host: str,
        kind: cpb.DrainEventKind.ValueType,
        *,
        vm: VmRow | None = None,
        message: str = "",
        progress: apb.MigrationProgress | None = None,
        plan: cpb.DrainPlan | None = None,
        status: bool = False,
    ) -> cpb.DrainEvent:
        event = cpb.DrainEvent(
            drain_id=drain_id,
            kind=kind,
            host=host,
            message=message,
            at=views.timestamp(self._clock()),
        )
        if vm is not None:
            event.vm_uuid = vm.vm_uuid
            event.vm.CopyFrom(views.vm_to_pb(vm))
        if progress is not None:
            event.progress.CopyFrom(progress)
        if plan is not None:
            event.plan.CopyFrom(plan)
        if status:
            event.status.CopyFrom(self.status(drain_id))
        return event

    def publish(self, bus: EventBus[cpb.DrainEvent], event: cpb.DrainEvent) -> None:
        """Logs the event and puts it on the drain's bus."""
        LOG.info(
            "drain event drain=%s host=%s kind=%s vm=%s %s",
            event.drain_id[:8],
            event.host,
            cpb.DrainEventKind.Name(event.kind).removeprefix("DRAIN_EVENT_KIND_").lower(),
            event.vm_uuid[:8],
            event.message,
        )
        bus.publish(event)
