"""The coordinator's dirty-rate windows before planning: which guests get longer ones."""

from __future__ import annotations

from hostmaint.coordinator import errors
from hostmaint.coordinator.dirty import Writer, readings_of, writer_of
from hostmaint.coordinator.gather import measure_windows
from hostmaint.coordinator.model import GIB, MIB
from hostmaint.protos import agent_pb2 as apb

LINK = 1.25e9  # 10 Gbit/s
# (rate, working set, memory) of each guest, as its writer really is
GUESTS = {
    "wide-fast": (1 * GIB, 3 * GIB, 16 * GIB),  # its set shows only in 4 s and 8 s
    "hot": (2 * GIB, 512 * MIB, 16 * GIB),  # set rewritten within 1 s: found at once
    "slow": (20 * MIB, 3 * GIB, 16 * GIB),  # below a tenth of the link: not worth waiting
    "idle": (0.0, 0.0, 16 * GIB),
}


class Source:
    """What a source agent's MeasureDirtyRate answers for those writers; records calls."""

    def __init__(self, fail_from_s: int | None = None) -> None:
        self.calls: list[tuple[int, list[str]]] = []
        self.fail_from_s = fail_from_s

    def measure_dirty_rate(self, uuids: list[str], window_s: int) -> dict[str, apb.DirtyRate]:
        self.calls.append((window_s, sorted(uuids)))
        if self.fail_from_s is not None and window_s >= self.fail_from_s:
            raise errors.AgentUnavailable("source", "addr", "gone")
        out = {}
        for uuid in uuids:
            rate, ws, _ = GUESTS[uuid]
            (reading,) = readings_of(rate, ws, (window_s,))
            out[uuid] = apb.DirtyRate(bytes_per_s=reading.bytes_per_s, window_s=window_s)
        return out


def _domains() -> dict[str, apb.Domain]:
    return {
        u: apb.Domain(uuid=u, memory_max_bytes=int(mem), rss_bytes=int(mem))
        for u, (_, _, mem) in GUESTS.items()
    }


def _run(source: Source, notes: list[str]) -> dict[str, Writer]:
    rates = source.measure_dirty_rate(list(GUESTS), 2)
    readings = measure_windows(source, _domains(), rates, 2, 8, LINK * 0.1, notes.append)
    return {u: writer_of(r) for u, r in readings.items()}


def test_only_fast_writers_whose_set_is_unseen_wait_for_longer_windows() -> None:
    source = Source()
    notes: list[str] = []
    writers = _run(source, notes)
    assert source.calls == [
        (2, sorted(GUESTS)),
        (1, sorted(GUESTS)),
        (4, ["wide-fast"]),
        (8, ["wide-fast"]),
    ]
    assert writers["wide-fast"] == Writer(1 * GIB, 3 * GIB)  # both read, nothing assumed
    assert writers["hot"].working_set_bytes == 512 * MIB
    assert writers["hot"].rate_floor_bytes_per_s == 512 * MIB
    assert writers["slow"] == Writer(20 * MIB)
    assert writers["idle"] == Writer(0.0)
    assert notes == []


def test_a_failed_longer_window_keeps_what_the_shorter_ones_read() -> None:
    source = Source(fail_from_s=4)
    notes: list[str] = []
    writers = _run(source, notes)
    assert [w for w, _ in source.calls] == [2, 1, 4]
    assert writers["wide-fast"] == Writer(1 * GIB)  # its rate, its set unknown
    assert len(notes) == 1 and "over 4s failed" in notes[0]
