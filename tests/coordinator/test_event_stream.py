"""A drain's event stream: followers see every event up to FINISHED, however long it runs."""

from __future__ import annotations

import threading
import time

from hostmaint.coordinator.executor import EventBus
from hostmaint.protos import coordinator_pb2 as cpb

EVENTS = 12_000  # well past the window of newest events kept for late re-attachers


def _event(i: int, kind: int = cpb.DRAIN_EVENT_KIND_PROGRESS) -> cpb.DrainEvent:
    return cpb.DrainEvent(kind=kind, message=str(i))


def _wait_for(count: int, received: list[cpb.DrainEvent], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while len(received) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    return len(received) >= count


def test_a_follower_that_keeps_up_receives_every_event_up_to_finished() -> None:
    """12,000 events in batches of 1,000, each read before the next is published (a
    drain publishes a few events a second; its follower keeps up)."""
    bus = EventBus()
    received: list[cpb.DrainEvent] = []

    def follow() -> None:
        for event in bus.follow(lambda: False):
            received.append(event)

    reader = threading.Thread(target=follow, name="follower", daemon=True)
    reader.start()
    for start in range(0, EVENTS, 1_000):
        for i in range(start, start + 1_000):
            bus.publish(_event(i))
        assert _wait_for(start + 1_000, received), f"the follower stopped at {len(received)}"
    bus.publish(_event(EVENTS, cpb.DRAIN_EVENT_KIND_FINISHED))
    bus.close()
    reader.join(30)
    assert not reader.is_alive(), "the follower never returned"
    assert [int(e.message) for e in received] == list(range(EVENTS + 1))
    assert received[-1].kind == cpb.DRAIN_EVENT_KIND_FINISHED


def test_a_late_follower_receives_the_first_events_then_the_newest_in_order() -> None:
    kept = 100
    bus = EventBus(kept=kept)
    for i in range(EVENTS):
        bus.publish(_event(i))
    bus.publish(_event(EVENTS, cpb.DRAIN_EVENT_KIND_FINISHED))
    bus.close()
    positions = [int(e.message) for e in bus.follow(lambda: False)]
    head = positions[: len(positions) - kept]
    assert head == list(range(len(head))) and 0 < len(head) <= 10
    assert positions[-kept:] == list(range(EVENTS + 1 - kept, EVENTS + 1))


def test_a_follower_attached_mid_stream_misses_nothing_after_it_attached() -> None:
    bus = EventBus(kept=50)
    for i in range(500):
        bus.publish(_event(i))
    stream = bus.follow(lambda: False)
    first = [int(next(stream).message) for _ in range(10 + 50)]
    assert first[:10] == list(range(10)) and first[10:] == list(range(450, 500))
    for i in range(500, 5_600):  # more than the window while the follower is between reads
        bus.publish(_event(i))
        assert int(next(stream).message) == i
    bus.close()
    assert list(stream) == []
