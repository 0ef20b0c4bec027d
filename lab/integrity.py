"""Whether lab guests' memory still holds what they wrote, from their own console lines.

Every lab guest checks all of its memory against what it wrote, a full
sweep every one to a few seconds (at most once a second, within a share of
its vCPU), and prints an ``event=verify`` line after each (lab/guest.py). Its counts are cumulative since boot and its sweep
counter only grows, whichever host it runs on.

To judge a migration: once it ended, mark each guest's console
(:func:`verify_mark`, the sweeps completed so far), then wait for a sweep
that started after the mark, i.e. two sweeps past it (:func:`verified_after`,
:func:`wait_verified`). That sweep read every page on the host the guest runs
on now; its ``mismatched_pages`` is 0 exactly when no page the guest wrote,
there or on any host before, was ever found lost, stale or corrupted.

Marks are sweep counts rather than file offsets: a console log may be
reopened and truncated by a migration's target (Nova's ``console.log``, a
pty log that QEMU opens without append), so lines may be torn, out of order
or preceded by a hole; lines that do not parse are skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from .guest import GuestError, GuestSerialError, GuestVerify, parse_serial_line

# Two sweeps of the lab's largest test guests (about 150 MiB: 5 to 10 s each at the
# checker's default share of an emulated vCPU), with room for a loaded host.
DEFAULT_TIMEOUT_S = 120.0


class VerifyTimeout(GuestError):
    """No full sweep after the mark in time, for each guest named in ``late``."""

    def __init__(self, late: dict[str, int], timeout_s: float) -> None:
        super().__init__(
            f"no full memory check after the mark within {timeout_s}s: "
            + ", ".join(f"{name} (sweeps at mark {mark})" for name, mark in late.items())
        )
        self.late = late
        self.timeout_s = timeout_s


def verify_events(text: str) -> list[GuestVerify]:
    """The verify lines of a console log, in file order; unparsable lines are skipped."""
    found = []
    for line in text.split("\n"):
        if "event=verify" not in line:
            continue
        try:
            event = parse_serial_line(line)
        except GuestSerialError:
            continue  # torn, or overwritten by a reopened log
        if isinstance(event, GuestVerify):
            found.append(event)
    return found


def _latest(text: str) -> GuestVerify | None:
    return max(verify_events(text), key=lambda v: v.sweeps, default=None)


def verify_mark(text: str) -> int:
    """The sweeps a guest had completed by now (0 before its first)."""
    latest = _latest(text)
    return latest.sweeps if latest is not None else 0


def verified_after(text: str, mark: int) -> GuestVerify | None:
    """The guest's latest figures once a whole sweep ran after ``mark``, else None.

    The sweep after the mark's may have begun before it; the one after that did not.
    """
    latest = _latest(text)
    return latest if latest is not None and latest.sweeps >= mark + 2 else None


def wait_verified(
    consoles: Mapping[str, Callable[[], str]],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    marks: Mapping[str, int] | None = None,
    *,
    interval_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, GuestVerify]:
    """Each guest's figures once a whole sweep ran after its mark (taken now if not given).

    ``consoles`` maps a guest's name to a function that reads its console log.
    Raises VerifyTimeout naming the guests that did not complete one in time.
    """
    if marks is None:
        marks = {name: verify_mark(read()) for name, read in consoles.items()}
    done: dict[str, GuestVerify] = {}
    deadline = clock() + timeout_s
    while True:
        for name, read in consoles.items():
            if name not in done:
                result = verified_after(read(), marks[name])
                if result is not None:
                    done[name] = result
        if len(done) == len(consoles):
            return done
        if clock() >= deadline:
            late = {n: marks[n] for n in consoles if n not in done}
            raise VerifyTimeout(late, timeout_s)
        sleep(interval_s)


def integrity_problems(results: Mapping[str, GuestVerify]) -> list[str]:
    """One line per guest whose checker found pages that did not hold what it wrote."""
    return [
        f"{name}: {v.mismatched_pages} mismatched pages "
        f"(first frames {', '.join(hex(p) for p in v.bad_pfns)})"
        for name, v in sorted(results.items())
        if v.mismatched_pages
    ]


def summary(results: Mapping[str, GuestVerify]) -> str:
    """The figures on one line, for a test's output."""
    return "; ".join(
        f"{name}: {v.mismatched_pages} mismatched of {v.checked_pages} checked ({v.sweeps} sweeps)"
        for name, v in sorted(results.items())
    )
