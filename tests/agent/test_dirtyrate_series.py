"""The agent's background dirty-rate schedule: windows that double, the latest of each kept."""

from __future__ import annotations

from typing import cast

from hostmaint.agent.dirtyrate import DirtyRateMeter, Schedule
from hostmaint.agent.libvirt_driver import (
    DIRTY_RATE_MEASURING,
    DirtyRateReading,
    LibvirtDriver,
    RawDomain,
)
from hostmaint.agent.types import (
    CpuDefinition,
    DirtyRate,
    DirtyRateMethod,
    DomainConfig,
    DomainState,
)

MIB = 1024 * 1024
# uuid -> (rate, working set, memory): what each guest's writer does
GUESTS = {
    "wide": (200 * MIB, 1200 * MIB, 4096 * MIB),  # its set shows only over 8 s
    "hot": (400 * MIB, 64 * MIB, 4096 * MIB),  # set rewritten within the first window
    "idle": (0.0, 0.0, 4096 * MIB),
}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        return False


class FakeLibvirt:
    """Measures as libvirt does: unique pages written in the window, over the window."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.windows: dict[str, int] = {}
        self.calls: list[tuple[int, list[str]]] = []

    def domain(self, uuid: str) -> RawDomain:
        _, _, memory = GUESTS[uuid]
        config = DomainConfig(
            uuid, uuid, int(memory), int(memory), 1, CpuDefinition(), (), (), None
        )
        return RawDomain(config, DomainState.RUNNING, -1, True, int(memory), 0, False)

    def list_domains(self) -> list[RawDomain]:
        return [self.domain(u) for u in GUESTS]

    def start_dirty_rate(self, uuid: str, window_s: int, method: DirtyRateMethod) -> None:
        if not self.calls or self.calls[-1][0] != window_s or uuid in self.calls[-1][1]:
            self.calls.append((window_s, []))
        self.calls[-1][1].append(uuid)
        self.windows[uuid] = window_s

    def dirty_rates(self, uuids: list[str]) -> list[DirtyRateReading]:
        out = []
        for uuid in uuids:
            rate, ws, _ = GUESTS[uuid]
            w = self.windows[uuid]
            unique = min(rate * w, ws) if ws else rate * w
            out.append(
                DirtyRateReading(
                    uuid,
                    DIRTY_RATE_MEASURING + 1,
                    DirtyRate(unique / w, w, DirtyRateMethod.DIRTY_BITMAP, self.clock()),
                )
            )
        return out


def _meter() -> tuple[DirtyRateMeter, FakeLibvirt, Clock]:
    clock = Clock()
    fake = FakeLibvirt(clock)
    meter = DirtyRateMeter(cast(LibvirtDriver, fake), wait=clock.wait, clock=clock)
    return meter, fake, clock


def test_each_domain_gets_half_the_window_and_the_window_then_longer_ones_while_they_tell_more() -> (
    None
):
    meter, fake, _ = _meter()
    schedule = Schedule(interval_s=60, window_s=2, batch_size=8, method=None, max_window_s=8)
    meter.measure_series(list(GUESTS), schedule)
    assert fake.calls == [(1, list(GUESTS)), (2, list(GUESTS)), (4, ["wide"]), (8, ["wide"])]
    assert [r.window_s for r in meter.series("wide")] == [1, 2, 4, 8]
    assert [r.window_s for r in meter.series("hot")] == [1, 2]
    assert meter.series("wide")[-1].bytes_per_s == 1200 * MIB / 8
    assert meter.last("wide") == meter.series("wide")[-1]


def test_a_new_reading_replaces_the_one_over_the_same_window_and_forget_drops_all() -> None:
    meter, _, clock = _meter()
    meter.measure(["hot"], 2, None)
    first = meter.series("hot")
    clock.now += 100
    meter.measure(["hot"], 2, None)
    (second,) = meter.series("hot")
    assert len(first) == 1 and second.measured_at == first[0].measured_at + 100 + 2
    meter.forget("hot")
    assert meter.series("hot") == () and meter.last("hot") is None


def test_a_schedule_with_a_one_second_window_measures_that_window_alone() -> None:
    schedule = Schedule(interval_s=60, window_s=1, batch_size=8, method=None, max_window_s=1)
    assert schedule.first_windows_s == (1,)
    assert Schedule(60, 4, 8, None, 16).first_windows_s == (2, 4)


class QemuLikeLibvirt(FakeLibvirt):
    """QEMU refuses a new measurement of a domain until its running one's window is over;
    one domain's start fails (it stopped between the check and the start)."""

    def __init__(self, clock: Clock, failing: str) -> None:
        super().__init__(clock)
        self.failing = failing
        self.until: dict[str, float] = {}

    def start_dirty_rate(self, uuid: str, window_s: int, method: DirtyRateMethod) -> None:
        from hostmaint.agent import errors

        if uuid == self.failing:
            raise errors.HypervisorError("dirty-rate", 55, "domain is not running")
        if self.clock() < self.until.get(uuid, 0.0):
            raise errors.HypervisorError(
                "dirty-rate", 1, "the dirty rate is already being measured"
            )
        self.until[uuid] = self.clock() + window_s
        super().start_dirty_rate(uuid, window_s, method)


def test_a_batch_failing_part_way_keeps_what_it_started_busy_until_qemu_is_done() -> None:
    import pytest

    from hostmaint.agent import errors

    clock = Clock()
    fake = QemuLikeLibvirt(clock, failing="idle")
    meter = DirtyRateMeter(cast(LibvirtDriver, fake), wait=clock.wait, clock=clock)
    with pytest.raises(errors.HypervisorError, match="not running"):
        meter.measure(["wide", "idle"], 4, None)
    assert "wide" in fake.until  # QEMU measures it whatever the batch did
    got = meter.measure(["wide"], 2, None)  # the next caller: no "already being measured"
    assert got["wide"].window_s == 2
