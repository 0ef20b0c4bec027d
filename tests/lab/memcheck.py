"""The lab tests' check that moved guests lost no memory: each guest's own checker, read
from its console once a full sweep ran after the call (see lab/integrity.py)."""

from __future__ import annotations

from collections.abc import Sequence

from hostmaint.lab import cluster, integrity
from hostmaint.lab.guest import GuestVerify
from hostmaint.lab.novalab import NovaLab, Server


def memory_problems(
    lab: cluster.Lab, names: Sequence[str]
) -> tuple[dict[str, GuestVerify], list[str]]:
    """Every guest's figures and the mismatches among them, once a sweep after now ended
    (a guest that completed none in time, lost or paused, is a problem too)."""
    try:
        results = lab.verify_memory(names)
    except integrity.VerifyTimeout as e:
        return {}, [str(e), *(_late_guest(lab, name) for name in e.late)]
    print(f"memory check: {integrity.summary(results)}")
    return results, integrity.integrity_problems(results)


def _late_guest(lab: cluster.Lab, name: str) -> str:
    """Where a guest that completed no sweep runs, and its console's last lines: what tells a
    stalled guest from a console no longer written."""
    hosts = [h.name for h in lab.running_on(name)]
    tail = lab.guest_serial(name)[-_CONSOLE_TAIL_CHARS:]
    return f"{name} runs on {hosts}; its console ends: {tail!r}"


_CONSOLE_TAIL_CHARS = 1200


def assert_memory_intact(lab: cluster.Lab, names: Sequence[str]) -> dict[str, GuestVerify]:
    """No page of these guests was ever found not to hold what the guest wrote."""
    results, problems = memory_problems(lab, names)
    assert problems == [], "\n".join(problems)
    return results


def assert_servers_memory_intact(nova: NovaLab, servers: Sequence[Server]) -> None:
    """The same for guests that Nova booted (their console logs are Nova's)."""
    results = nova.verify_memory(list(servers))
    print(f"memory check: {integrity.summary(results)}")
    assert integrity.integrity_problems(results) == []
