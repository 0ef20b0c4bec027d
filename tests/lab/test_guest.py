"""The lab guest's spec, kernel command line and serial format (no QEMU needed).

Its behaviour under QEMU (rates, fill, throttling) is proven by the lab tests
that boot it: test_agent_qemu.py, test_cluster.py and test_link_sharing.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from hostmaint.lab.guest import (
    GuestFailure,
    GuestMode,
    GuestProgress,
    GuestReady,
    GuestSerialError,
    GuestSpec,
    GuestSpecError,
    guest_cmdline,
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
