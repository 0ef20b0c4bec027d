"""The lab guest's spec, kernel command line and serial format, and the reading of its
memory checks (no QEMU needed).

Its behaviour under QEMU (rates, fill, throttling) is proven by the lab tests
that boot it: test_guest_boot.py (patterns and the memory check, QEMU alone),
test_agent_qemu.py, test_cluster.py and test_link_sharing.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from hostmaint.lab import domains, errors, integrity
from hostmaint.lab.guest import (
    META_GAP_KIB,
    GuestCorruption,
    GuestFailure,
    GuestMode,
    GuestPattern,
    GuestProgress,
    GuestReady,
    GuestSerialError,
    GuestSpec,
    GuestSpecError,
    GuestVerify,
    guest_cmdline,
    meta_bytes,
    parse_serial,
    parse_serial_line,
)

READY = (
    "hmguest event=ready mem_mib=256 ws_mib=128 rate_mibps=40.000 mode=paced fill_mib=64 "
    "work=8 tsc_khz=2445417 fill_ms=612 "
    "boot_ms=2474 name=vm1"
)
PROGRESS = (
    "hmguest event=progress t=12.04 dirtied_pages=123321 dirtied_mib=481.7 "
    "rate_mibps=40.000 busy_pct=6.4 ws_mib=128 mode=paced"
)


# ---- spec, command line and parser (no QEMU) ----


def test_cmdline_carries_every_parameter() -> None:
    spec = GuestSpec("vm1", 512, 192, 40.5, GuestMode.CPU, fill_mib=64, work_passes=7)
    assert guest_cmdline(spec) == "ws=192 rate=40.5 mode=cpu fill=64 work=7 name=vm1"


def test_cmdline_rate_is_trimmed_to_thousandths() -> None:
    spec = GuestSpec("a", 256, 64, 20.0)
    assert "rate=20 " in guest_cmdline(spec)
    assert "work=" not in guest_cmdline(spec)
    assert "rate=0.125 " in guest_cmdline(GuestSpec("a", 256, 64, 0.125))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"memory_mib": 64}, "memory_mib"),
        ({"memory_mib": 4096}, "memory_mib"),
        ({"working_set_mib": 200, "fill_mib": 60}, "fill_mib"),
        ({"dirty_rate_mibps": -1.0}, "dirty_rate_mibps"),
        ({"working_set_mib": 0}, "working_set_mib"),
        ({"name": "a b"}, "name"),
        ({"work_passes": 0}, "work_passes"),
    ],
)
def test_spec_rejects_what_the_guest_cannot_do(kwargs: dict[str, Any], field: str) -> None:
    base: dict[str, Any] = {
        "name": "vm1",
        "memory_mib": 256,
        "working_set_mib": 64,
        "dirty_rate_mibps": 10.0,
    }
    with pytest.raises(GuestSpecError) as info:
        GuestSpec(**(base | kwargs))
    assert info.value.field == field


def test_spec_accepts_mode_as_string() -> None:
    spec = GuestSpec("vm1", 256, 64, 10.0, "cpu")  # type: ignore[arg-type]
    assert spec.mode is GuestMode.CPU
    assert spec.memory_bytes == 256 * 1024 * 1024


def test_parse_ready_and_progress() -> None:
    ready = parse_serial_line("Booting from ROM.." + READY)
    assert isinstance(ready, GuestReady)
    assert (ready.mem_mib, ready.ws_mib, ready.fill_mib, ready.name) == (256, 128, 64, "vm1")
    assert ready.mode is GuestMode.PACED and ready.rate_mibps == 40.0
    progress = parse_serial_line(PROGRESS)
    assert isinstance(progress, GuestProgress)
    assert progress.t_s == 12.04 and progress.dirtied_pages == 123321
    assert progress.rate_mibps == 40.0 and progress.busy_pct == 6.4


def test_parse_error_and_noise() -> None:
    failure = parse_serial_line("hmguest event=error reason=no_memory need_mib=300 avail_mib=253")
    assert failure == GuestFailure("no_memory", {"need_mib": "300", "avail_mib": "253"})
    assert parse_serial_line("SeaBIOS (version 1.16.2)") is None
    assert parse_serial_line("hmguest event=boot") is None
    with pytest.raises(GuestSerialError):
        parse_serial_line("hmguest event=progress t=1")


def test_parse_serial_skips_a_torn_last_line() -> None:
    events = parse_serial(f"noise\n{READY}\n{PROGRESS}\n{PROGRESS[:30]}")
    assert [type(e) for e in events] == [GuestReady, GuestProgress]


# ---- write patterns and the memory check ----

READY_NEW = (
    "hmguest event=ready mem_mib=256 ws_mib=64 rate_mibps=20.000 mode=cpu fill_mib=32 "
    "work=3 tsc_khz=2445417 region_base=0x00200000 region_end=0x0ffe0000 fill_ms=80 "
    "boot_ms=300 pattern=hotcold seed=7 hot_pct=90 hot_ws_pct=10 duty_pct=100.0 verify=on "
    "verify_budget_pct=5 meta_base=0x0010a000 meta_kib=104 corrupt_after_s=5 name=vm1"
)
PROGRESS_NEW = PROGRESS + (
    " pattern=random distinct_pages=3012 distinct_mibps=11.765 cfg_rate_mibps=20.000 "
    "on_pct=100.0 verify_pct=2.1"
)


def _verify_line(sweeps: int, mismatched: int = 0, bad: str = "") -> str:
    return (
        f"hmguest event=verify t={sweeps}.02 sweeps={sweeps} checked_pages={sweeps * 24576} "
        f"pages=24576 sweep_ms=1000 word={sweeps * 389 % 1024} mismatched_pages={mismatched} "
        f"sweep_mismatched={mismatched}" + (f" bad_pfns={bad}" if bad else "")
    )


def test_cmdline_of_each_pattern() -> None:
    base = ("vm1", 256, 64, 20.0, GuestMode.PACED, 32)
    assert "pattern=" not in guest_cmdline(GuestSpec(*base))
    random_ = GuestSpec(*base, pattern=GuestPattern.RANDOM, seed=42)
    assert (
        guest_cmdline(random_) == "ws=64 rate=20 mode=paced fill=32 pattern=random seed=42 name=vm1"
    )
    hot = GuestSpec(*base, pattern=GuestPattern.HOTCOLD, hot_pct=95, hot_ws_pct=5)
    assert "pattern=hotcold hot_pct=95 hot_ws_pct=5 name=vm1" in guest_cmdline(hot)
    bursty = GuestSpec("vm1", 256, 64, 20.0, "cpu", pattern="bursty", on_ms=300, off_ms=700)  # type: ignore[arg-type]
    assert bursty.pattern is GuestPattern.BURSTY and bursty.mode is GuestMode.CPU
    assert "mode=cpu fill=0 pattern=bursty on_ms=300 off_ms=700 name=vm1" in guest_cmdline(bursty)
    assert bursty.duty_pct == 30.0 and random_.duty_pct == 100.0
    assert GuestSpec("b", 256, 64, 1.0, pattern=GuestPattern.BURSTY).duty_pct == 50.0
    quiet = GuestSpec(*base, verify=False)
    assert guest_cmdline(quiet).endswith(" verify=0 name=vm1")
    broken = GuestSpec(*base, verify_budget_pct=20, corrupt_after_s=5)
    assert guest_cmdline(broken).endswith(" verify_budget_pct=20 corrupt_after_s=5 name=vm1")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pattern": "zigzag"}, "pattern"),
        ({"mode": "turbo"}, "mode"),
        ({"hot_pct": 90}, "hot_pct"),  # only for hotcold
        ({"pattern": "hotcold", "hot_pct": 101}, "hot_pct"),
        ({"pattern": "hotcold", "hot_ws_pct": 0}, "hot_ws_pct"),
        ({"on_ms": 500}, "on_ms"),  # only for bursty
        ({"pattern": "bursty", "on_ms": 5}, "on_ms"),
        ({"pattern": "bursty", "off_ms": 3_600_001}, "off_ms"),
        ({"seed": 1}, "seed"),  # seq has no generator
        ({"pattern": "random", "seed": -1}, "seed"),
        ({"pattern": "random", "seed": 2**32}, "seed"),
        ({"verify": "yes"}, "verify"),
        ({"corrupt_after_s": 0}, "corrupt_after_s"),
        ({"verify_budget_pct": 0}, "verify_budget_pct"),
        ({"verify_budget_pct": 51}, "verify_budget_pct"),
        ({"verify_budget_pct": 5, "verify": False}, "verify_budget_pct"),
        ({"corrupt_after_s": 3, "verify": False}, "corrupt_after_s"),
    ],
)
def test_spec_rejects_bad_pattern_parameters(kwargs: dict[str, Any], field: str) -> None:
    base: dict[str, Any] = {
        "name": "vm1",
        "memory_mib": 256,
        "working_set_mib": 64,
        "dirty_rate_mibps": 10.0,
    }
    with pytest.raises(GuestSpecError) as info:
        GuestSpec(**(base | kwargs))
    assert info.value.field == field


def test_spec_counts_a_record_too_big_for_the_gap_below_the_region() -> None:
    seq, rnd, paced, cpu = GuestPattern.SEQ, GuestPattern.RANDOM, GuestMode.PACED, GuestMode.CPU
    # A paced walk needs no record: block sums (16 KiB) and a bitmap (8 KiB) of 253 MiB.
    assert meta_bytes(64, 253, seq, paced) == 16384 + 8192
    # Picked or cpu-written pages: a word each (64 KiB), random ones a bit each too.
    assert meta_bytes(64, 253, seq, cpu) == 16384 + 8192 + 65536
    assert meta_bytes(64, 253, rnd, paced) == 16384 + 8192 + 65536 + 4096
    assert GuestSpec("a", 256, 64, 1.0, fill_mib=189).meta_overflow_mib == 0
    # 1 GiB picked at random: a 1 MiB record, more than the gap below 2 MiB holds.
    assert meta_bytes(1024, 2045, rnd, paced) > META_GAP_KIB * 1024
    wide = GuestSpec("w", 2048, 1024, 1.0, pattern=rnd)
    assert wide.meta_overflow_mib == 2
    with pytest.raises(GuestSpecError) as info:
        GuestSpec("w", 2048, 1024, 1.0, pattern=rnd, fill_mib=1020)
    assert "the guest's record" in info.value.reason
    assert GuestSpec("w", 2048, 1024, 1.0, fill_mib=1021).meta_overflow_mib == 0


def test_parse_new_ready_and_progress() -> None:
    ready = parse_serial_line(READY_NEW)
    assert isinstance(ready, GuestReady)
    assert ready.pattern is GuestPattern.HOTCOLD and ready.mode is GuestMode.CPU
    assert (ready.seed, ready.hot_pct, ready.hot_ws_pct) == (7, 90, 10)
    assert (ready.on_ms, ready.off_ms, ready.duty_pct) == (None, None, 100.0)
    assert ready.verify and ready.verify_budget_pct == 5 and ready.corrupt_after_s == 5
    progress = parse_serial_line(PROGRESS_NEW)
    assert isinstance(progress, GuestProgress)
    assert progress.pattern is GuestPattern.RANDOM
    assert (progress.distinct_pages, progress.distinct_mibps) == (3012, 11.765)
    assert (progress.cfg_rate_mibps, progress.on_pct, progress.verify_pct) == (20.0, 100.0, 2.1)
    # The fields every line had keep their meaning.
    assert progress.rate_mibps == 40.0 and progress.dirtied_pages == 123321


def test_parse_old_lines_have_the_old_defaults() -> None:
    ready = parse_serial_line(READY)
    assert isinstance(ready, GuestReady)
    assert ready.pattern is GuestPattern.SEQ and not ready.verify and ready.duty_pct == 100.0
    progress = parse_serial_line(PROGRESS)
    assert isinstance(progress, GuestProgress)
    assert progress.pattern is GuestPattern.SEQ
    assert progress.distinct_pages is None and progress.verify_pct is None


def test_parse_verify_and_corrupt_lines() -> None:
    clean = parse_serial_line(_verify_line(3))
    assert clean == GuestVerify(3.02, 3, 73728, 24576, 1000, 0, 0, (), 1167 % 1024)
    bad = parse_serial_line(_verify_line(9, 2, "0x00002200,0x00004a01"))
    assert isinstance(bad, GuestVerify)
    assert bad.mismatched_pages == 2 and bad.bad_pfns == (0x2200, 0x4A01)
    corrupt = parse_serial_line("hmguest event=corrupt t=5.00 pfn=0x00002200")
    assert corrupt == GuestCorruption(5.0, 0x2200)
    with pytest.raises(GuestSerialError):
        parse_serial_line("hmguest event=verify t=1.00 sweeps=1")


def test_a_mark_needs_a_whole_sweep_after_it() -> None:
    text = "".join(_verify_line(n) + "\n" for n in (1, 2, 3))
    mark = integrity.verify_mark(text)
    assert mark == 3
    assert integrity.verify_mark("hmguest event=boot\n") == 0
    # Sweep 4 may have begun before the mark: not enough.
    assert integrity.verified_after(text + _verify_line(4) + "\n", mark) is None
    later = text + _verify_line(4) + "\n" + _verify_line(5, 1, "0x00000300") + "\n"
    result = integrity.verified_after(later, mark)
    assert result is not None and (result.sweeps, result.mismatched_pages) == (5, 1)
    assert integrity.integrity_problems({"vm1": result}) == [
        "vm1: 1 mismatched pages (first frames 0x300)"
    ]


def test_a_reopened_console_is_read_by_its_sweep_counts() -> None:
    """A migration's target reopened the log: its new lines overwrite the start, the
    source's last lines stay further on behind a hole, and a line is torn."""
    target = _verify_line(7) + "\n" + _verify_line(8) + "\n"
    source = "\0" * 10 + _verify_line(5)[:40] + "\n" + _verify_line(6) + "\n"
    text = target + source
    assert [v.sweeps for v in integrity.verify_events(text)] == [7, 8, 6]
    assert integrity.verify_mark(text) == 8
    assert integrity.verified_after(text, 6) is not None
    assert integrity.verified_after(text, 7) is None


def test_wait_verified_polls_each_console_until_its_sweep() -> None:
    logs = {"a": [_verify_line(1)], "b": [_verify_line(4)]}
    now = [0.0]

    def advance(s: float) -> None:
        now[0] += s
        for lines in logs.values():
            lines.append(_verify_line(int(lines[-1].split("sweeps=")[1].split()[0]) + 1))

    consoles = {n: (lambda n=n: "\n".join(logs[n]) + "\n") for n in logs}
    results = integrity.wait_verified(consoles, 10.0, clock=lambda: now[0], sleep=advance)
    assert {n: v.sweeps for n, v in results.items()} == {"a": 3, "b": 6}
    assert now[0] == 1.0  # two polls, half a second apart
    assert "a: 0 mismatched of 73728 checked (3 sweeps)" in integrity.summary(results)


def test_wait_verified_names_the_guests_that_never_swept() -> None:
    now = [0.0]

    def advance(s: float) -> None:
        now[0] += s

    consoles = {"stuck": lambda: _verify_line(2) + "\n"}
    with pytest.raises(integrity.VerifyTimeout) as info:
        integrity.wait_verified(consoles, 3.0, clock=lambda: now[0], sleep=advance)
    assert info.value.late == {"stuck": 2}
    assert now[0] >= 3.0


def test_a_guest_plan_file_takes_the_pattern_fields() -> None:
    plans = domains.guest_plans_from_dict(
        {
            "guests": [
                {
                    "name": "vm1",
                    "memory_mib": 256,
                    "working_set_mib": 64,
                    "dirty_rate_mibps": 20,
                    "pattern": "hotcold",
                    "hot_pct": 80,
                    "host": 1,
                }
            ]
        }
    )
    assert plans[0].spec.pattern is GuestPattern.HOTCOLD and plans[0].spec.hot_pct == 80
    with pytest.raises(errors.SpecError, match="only for pattern bursty"):
        domains.guest_plans_from_dict(
            {"guests": [{"name": "b", "memory_mib": 256, "working_set_mib": 8,
                         "dirty_rate_mibps": 1, "on_ms": 100}]}
        )  # fmt: skip
