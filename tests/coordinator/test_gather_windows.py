"""The coordinator's dirty-rate windows before planning: which guests get longer ones."""

from __future__ import annotations

from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from hostmaint.common.dirty import Writer, readings_of, writer_of
from hostmaint.coordinator import errors
from hostmaint.coordinator.agents import AgentRegistry
from hostmaint.coordinator.drivers.base import Instance, InstanceState
from hostmaint.coordinator.gather import Inputs, gather, measure_windows, stored_readings
from hostmaint.coordinator.model import GIB, MIB, Link
from hostmaint.protos import agent_pb2 as apb
from tests.coordinator.simagents import Guest, SimAgents
from tests.coordinator.simdriver import SimDriver, SimHost

LINK = 1.25e9  # 10 Gbit/s
NOW = 1_800_000_000.0
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


# ---- planning on the agent's background readings ------------------------------------


def _sim(readings_at: float | None) -> tuple[SimDriver, SimAgents]:
    guests = {
        "hot": Guest(4 * GIB, 4 * GIB, rate_bytes_per_s=400 * MIB, working_set_bytes=256 * MIB),
        "cool": Guest(4 * GIB, 4 * GIB, rate_bytes_per_s=4 * MIB),
    }
    driver = SimDriver(
        [SimHost("src", 64 * 1024, 64), SimHost("dst", 64 * 1024, 64)],
        [Instance(u, u, "src", "p", InstanceState.ACTIVE, None, "f", 2, 4 * 1024) for u in guests],
        clock=lambda: NOW,
        link=Link(LINK),
    )
    return driver, SimAgents(driver, guests, LINK, clock=lambda: NOW, readings_at=readings_at)


def _gather(agents: SimAgents, driver: SimDriver, max_age_s: float) -> Inputs:
    return gather(
        "src",
        driver,
        cast(AgentRegistry, agents),
        link_bandwidth_bytes_per_s=LINK,
        dirty_rate_window_s=2,
        dirty_rate_max_window_s=8,
        vm_max_downtime_ms={},
        target_hosts=[],
        dirty_rate_max_age_s=max_age_s,
        clock=lambda: NOW,
    )


def test_fresh_background_readings_are_planned_on_without_measuring() -> None:
    driver, agents = _sim(readings_at=NOW - 30)
    inputs = _gather(agents, driver, max_age_s=120)
    assert agents.called("MeasureDirtyRate") == []
    by_uuid = {vm.uuid: vm for vm in inputs.vms}
    assert by_uuid["hot"].working_set_bytes == 256 * MIB  # read from the 1 s and 2 s windows
    assert by_uuid["cool"].dirty_rate_bytes_per_s == 4 * MIB
    assert any(
        "2 of 2 VMs from the agent's background readings (the oldest 30s" in n for n in inputs.notes
    )
    (rates,) = inputs.rate_notes  # the note the plan repeats
    assert rates in inputs.notes and "background readings" in rates
    source = inputs.rate_source  # and what the plan says of it, for clients
    assert (source.background_vms, source.oldest_background_age_s) == (2, 30.0)
    assert (source.measured_vms, source.measuring_s) == (0, 0.0)


def test_readings_older_than_the_limit_are_measured_afresh_and_the_wait_is_reported() -> None:
    driver, agents = _sim(readings_at=NOW - 300)
    inputs = _gather(agents, driver, max_age_s=120)
    assert [c.detail for c in agents.called("MeasureDirtyRate")] == ["2s", "1s"]
    assert any(n.startswith("measured the dirty rates of 2 VMs in") for n in inputs.notes)
    assert [n.startswith("measured the dirty rates of 2 VMs in") for n in inputs.rate_notes] == [
        True
    ]
    source = inputs.rate_source
    # (the test's clock stands still: the measurement took no time by it)
    assert (source.background_vms, source.measured_vms, source.measuring_s) == (0, 2, 0.0)


def test_a_max_age_of_zero_always_measures() -> None:
    driver, agents = _sim(readings_at=NOW)
    _gather(agents, driver, max_age_s=0)
    assert agents.called("MeasureDirtyRate")


def test_stored_readings_need_the_first_two_windows_and_stop_at_a_gap() -> None:
    at = Timestamp(seconds=int(NOW))
    domain = apb.Domain(
        dirty_rates=[
            apb.DirtyRate(bytes_per_s=b, window_s=w, measured_at=at)
            for w, b in ((1, 10.0), (2, 9.0), (8, 3.0))
        ]
    )
    assert [r.window_s for r in stored_readings(domain, 2, NOW - 1)] == [1, 2]  # no 4 s: ends
    assert stored_readings(domain, 4, NOW - 1) == []  # no 4 s window at all
    assert stored_readings(domain, 2, NOW + 1) == []  # all too old
