"""The lab guest under QEMU alone (no libvirt, no lab): what each write pattern reports
matches what it does, and its memory check finds a page changed behind its back, and
nothing else.

Five guests run side by side for about fifteen seconds: a sequential walk whose one
fill page is zeroed on purpose (``corrupt_after_s``), a uniform random writer, a hot/cold
writer, a bursty writer and a random CPU-bound writer. Their expected distinct
pages follow from each line's own write rate: writing ``w`` uniformly random pages of a
set of ``n`` leaves ``n (1 - exp(-w / n))`` distinct.
"""

from __future__ import annotations

import math
import shutil
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostmaint.lab import domains
from hostmaint.lab.guest import (
    GuestCorruption,
    GuestEvent,
    GuestMode,
    GuestPattern,
    GuestProgress,
    GuestReady,
    GuestSpec,
    GuestVerify,
    build_guest,
    guest_cmdline,
    have_toolchain,
    parse_serial,
)
from hostmaint.lab.state import wait_until

pytestmark = pytest.mark.lab
QEMU = "/usr/bin/qemu-system-x86_64"
SEQ = GuestSpec("gb-seq", 128, 16, 8, GuestMode.PACED, 32, corrupt_after_s=3)
RANDOM = GuestSpec("gb-random", 128, 64, 32, GuestMode.PACED, 0, pattern=GuestPattern.RANDOM)
HOTCOLD = GuestSpec("gb-hotcold", 128, 64, 32, GuestMode.PACED, 8, pattern=GuestPattern.HOTCOLD)
BURSTY = GuestSpec(
    "gb-bursty", 128, 16, 8, GuestMode.PACED, 0, pattern=GuestPattern.BURSTY, on_ms=300, off_ms=700
)
CPU_RANDOM = GuestSpec(
    "gb-cpu-random", 128, 16, 4, GuestMode.CPU, 16, pattern=GuestPattern.RANDOM, seed=7
)
GUESTS = [SEQ, RANDOM, HOTCOLD, BURSTY, CPU_RANDOM]
PROGRESS_LINES = 16
# These guests' sweeps (4k to 18k pages) at 5 % of an emulated vCPU.
SWEEP_MAX_MS = 8000
TIMEOUT_S = 120.0


@dataclass
class Run:
    events: dict[str, list[GuestEvent]]

    def ready(self, spec: GuestSpec) -> GuestReady:
        (ready,) = [e for e in self.events[spec.name] if isinstance(e, GuestReady)]
        return ready

    def progress(self, spec: GuestSpec) -> list[GuestProgress]:
        lines = [e for e in self.events[spec.name] if isinstance(e, GuestProgress)]
        return lines[1:]  # the first interval includes the start

    def verifies(self, spec: GuestSpec) -> list[GuestVerify]:
        return [e for e in self.events[spec.name] if isinstance(e, GuestVerify)]


def _qemu(spec: GuestSpec, kernel: Path, serial: Path, accel: domains.Accel) -> list[str]:
    khz = domains.host_tsc_khz() if accel is domains.Accel.KVM else None
    return [
        QEMU,
        "-machine",
        f"pc,accel={accel.value}",
        "-m",
        str(spec.memory_mib),
        "-kernel",
        str(kernel),
        "-append",
        guest_cmdline(spec) + (f" tsc_khz={khz}" if khz else ""),
        "-serial",
        f"file:{serial}",
        "-display",
        "none",
        "-nodefaults",
        "-no-reboot",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    if not (shutil.which(QEMU) and have_toolchain()):
        pytest.skip("needs qemu-system-x86_64 and gcc")
    work = tmp_path_factory.mktemp("guest-boot")
    kernel = build_guest(work / "build")
    accel, reason = domains.detect_accel()
    print(f"\naccel={accel.value} ({reason})")
    serials = {g.name: work / f"{g.name}.log" for g in GUESTS}
    procs = [
        subprocess.Popen(
            _qemu(g, kernel, serials[g.name], accel),
            stdout=subprocess.DEVNULL,
            stderr=(work / f"{g.name}.err").open("w"),
        )
        for g in GUESTS
    ]

    def events() -> dict[str, list[GuestEvent]]:
        return {
            name: parse_serial(path.read_text(errors="replace")) if path.exists() else []
            for name, path in serials.items()
        }

    def enough() -> bool:
        if any(p.poll() is not None for p in procs):
            return True  # a QEMU ended: the assertion below says which
        return all(
            sum(isinstance(e, GuestProgress) for e in lines) >= PROGRESS_LINES
            for lines in events().values()
        )

    try:
        done = wait_until(enough, TIMEOUT_S, interval_s=0.5)
        exited = {g.name: p.returncode for g, p in zip(GUESTS, procs, strict=True) if p.poll()}
        assert done and not exited, f"guests did not run: exited {exited}, {events()}"
        yield Run(events())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _known(value: float | None) -> float:
    """A figure that new guests' progress lines always carry."""
    assert value is not None
    return value


def _random_distinct_mib(ws_mib: float, writes_mib: float) -> float:
    return ws_mib * (1 - math.exp(-writes_mib / ws_mib)) if ws_mib else 0.0


def test_every_guest_checks_all_its_memory_and_finds_nothing_else(run: Run) -> None:
    for spec in GUESTS:
        ready = run.ready(spec)
        assert ready.verify and ready.verify_budget_pct == 5
        pages = (spec.working_set_mib + spec.fill_mib) * 256
        verifies = run.verifies(spec)
        last = verifies[-1]
        share = statistics.mean(_known(p.verify_pct) for p in run.progress(spec))
        print(f"{spec.name}: checker {share:.1f} % of the vCPU, {last}")
        assert len(verifies) >= 3 and last.pages == pages
        assert [v.sweeps for v in verifies] == list(range(1, len(verifies) + 1))
        assert last.checked_pages == last.sweeps * pages
        # At most one sweep a second, within its 5 % of the vCPU.
        assert last.sweeps <= last.t_s + 1
        sweep_ms = [v.sweep_ms for v in verifies[1:]]
        assert max(sweep_ms) < SWEEP_MAX_MS, sweep_ms
        assert share < 10.0
        if spec is not SEQ:
            assert last.mismatched_pages == 0 and last.bad_pfns == ()


def test_a_page_changed_behind_the_guests_back_is_found_within_a_sweep(run: Run) -> None:
    ready = run.ready(SEQ)
    assert ready.corrupt_after_s == 3
    (corrupt,) = [e for e in run.events[SEQ.name] if isinstance(e, GuestCorruption)]
    # The middle fill page, 2 MiB being where the fill starts here.
    assert corrupt.pfn == (0x200000 >> 12) + SEQ.fill_mib * 256 // 2
    verifies = run.verifies(SEQ)
    before = [v for v in verifies if v.t_s < corrupt.t_s]
    after = [v for v in verifies if v.t_s > corrupt.t_s]
    assert before and all(v.mismatched_pages == 0 for v in before)
    found = next(v for v in after if v.mismatched_pages)
    print(f"corrupted {hex(corrupt.pfn)} at {corrupt.t_s}s, found at {found.t_s}s: {found}")
    # Within the sweep after the one under way.
    assert found.t_s - corrupt.t_s < 2 * max(v.sweep_ms for v in verifies) / 1000
    assert (found.mismatched_pages, found.bad_pfns) == (1, (corrupt.pfn,))
    # Counted once, found again by every sweep since.
    assert all((v.mismatched_pages, v.sweep_mismatched) == (1, 1) for v in after[-2:])


def test_a_sequential_walk_writes_distinct_pages_only(run: Run) -> None:
    lines = run.progress(SEQ)
    assert all(p.pattern is GuestPattern.SEQ and p.cfg_rate_mibps == 8.0 for p in lines)
    assert all(p.distinct_mibps == p.rate_mibps for p in lines)
    assert statistics.median(p.rate_mibps for p in lines) == pytest.approx(8.0, rel=0.1)


def test_random_writes_rewrite_pages_as_uniform_picks_do(run: Run) -> None:
    lines = run.progress(RANDOM)
    assert run.ready(RANDOM).seed is not None  # from the name
    rate = statistics.median(p.rate_mibps for p in lines)
    assert rate == pytest.approx(32.0, rel=0.1)
    ratios = [_known(p.distinct_mibps) / _random_distinct_mib(64, p.rate_mibps) for p in lines]
    print(f"random: writes {rate:.1f} MiB/s, distinct/expected {[round(r, 3) for r in ratios]}")
    assert statistics.median(ratios) == pytest.approx(1.0, abs=0.03)
    assert all(_known(p.distinct_mibps) < 0.85 * p.rate_mibps for p in lines)


def test_hotcold_writes_mostly_rewrite_the_hot_part(run: Run) -> None:
    ready = run.ready(HOTCOLD)
    assert (ready.hot_pct, ready.hot_ws_pct) == (90, 10)
    hot = 64 * 256 * 10 // 100 / 256  # MiB, as the guest rounds it
    cold = 64 - hot

    def expected(rate: float) -> float:
        return _random_distinct_mib(hot, 0.9 * rate) + _random_distinct_mib(cold, 0.1 * rate)

    lines = run.progress(HOTCOLD)
    ratios = [_known(p.distinct_mibps) / expected(p.rate_mibps) for p in lines]
    print(f"hotcold: distinct/expected {[round(r, 3) for r in ratios]}")
    assert statistics.median(ratios) == pytest.approx(1.0, abs=0.03)
    assert all(_known(p.distinct_mibps) < 0.4 * p.rate_mibps for p in lines)


def test_a_bursty_writer_writes_only_in_its_on_phases(run: Run) -> None:
    ready = run.ready(BURSTY)
    assert (ready.on_ms, ready.off_ms, ready.duty_pct) == (300, 700, 30.0)
    lines = run.progress(BURSTY)
    on = statistics.mean(_known(p.on_pct) for p in lines)
    rate = statistics.mean(p.rate_mibps for p in lines)
    print(f"bursty: on {on:.1f} %, writes {rate:.2f} MiB/s (8 MiB/s while on)")
    assert on == pytest.approx(30.0, abs=3.0)
    assert rate == pytest.approx(8.0 * on / 100, rel=0.15)
    assert all(p.cfg_rate_mibps == 8.0 for p in lines)


def test_a_cpu_bound_random_writer_rewrites_whole_pages_and_checks_them(run: Run) -> None:
    lines = run.progress(CPU_RANDOM)
    assert run.ready(CPU_RANDOM).seed == 7
    assert all(p.mode is GuestMode.CPU and p.pattern is GuestPattern.RANDOM for p in lines)
    ratios = [_known(p.distinct_mibps) / _random_distinct_mib(16, p.rate_mibps) for p in lines]
    assert statistics.median(ratios) == pytest.approx(1.0, abs=0.05)
    assert run.verifies(CPU_RANDOM)[-1].mismatched_pages == 0
