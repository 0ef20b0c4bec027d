"""A drain's event stream: followers see every event up to FINISHED, however long it runs."""

from __future__ import annotations

import threading

from hostmaint.coordinator.executor import EventBus
from hostmaint.protos import coordinator_pb2 as cpb

EVENTS = 12_000  # well past the window of newest events kept for late re-attachers


def _event(i: int, kind: int = cpb.DRAIN_EVENT_KIND_PROGRESS) -> cpb.DrainEvent:
    return cpb.DrainEvent(kind=kind, message=str(i))


def test_a_follower_that_keeps_up_receives_every_event_up_to_finished() -> None:
    bus = EventBus()
    received: list[cpb.DrainEvent] = []
    following = threading.Event()

    def follow() -> None:
        following.set()
        received.extend(bus.follow(lambda: False))

    reader = threading.Thread(target=follow, name="follower", daemon=True)
    reader.start()
    assert following.wait(5)
    for i in range(EVENTS):
        bus.publish(_event(i))
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
