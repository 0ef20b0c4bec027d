"""The agent's downtime floor under the real downtime steps of Nova's libvirt driver.

Nova's `_live_migration_monitor` raises QEMU's downtime limit from
`live_migration_downtime / live_migration_downtime_steps` to
`live_migration_downtime`, one step every `live_migration_downtime_delay`
seconds per GiB of the guest's data (counted as at least 2 GiB). Here Nova
runs docs/nova.md's mode 1 with the delay at its minimum, 3 s, so a step
comes every 6 s: 50, 95, 140, ... 500 ms. A separate lab and Nova: Nova's
compute service refuses to start beside domains another Nova left.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hostmaint.lab import cluster
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.lab.novalab import NovaLab
from hostmaint.protos import agent_pb2 as pb
from tests.lab.memcheck import assert_servers_memory_intact
from tests.lab.novasite import (
    Site,
    T,
    agent,
    lab_up,
    nova_site,
    running_migration,
    settled,
)
from tests.nova.drainlab import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.nova]
PREFIX = "hm-nls"
# Rewrites a working set faster than the lab link carries it: never converges by itself,
# at any of Nova's steps.
HOT = GuestSpec(f"{PREFIX}-hot", 256, 96, 60, GuestMode.PACED, 0)
FLOOR_MS = 300
STEP = "Increasing downtime to "


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Lab]:
    yield from lab_up(PREFIX, "10.213.25.0/24", tmp_path_factory.mktemp("nls"))


@pytest.fixture(scope="module")
def site(lab: cluster.Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    fast_steps = ("libvirt.live_migration_downtime_delay=3",)
    yield from nova_site(lab, tmp_path_factory, [HOT], "mode1", fast_steps)


def _steps(nova: NovaLab, after: int = 0) -> list[int]:
    """The downtime steps Nova's monitor logged, from the `after`-th on."""
    lines = nova.log_lines(STEP)
    return [int(line.split(STEP)[1].split()[0]) for line in lines[after:]]


def test_agents_floor_survives_novas_real_downtime_steps(site: Site) -> None:
    """The agent, told to hold a floor, sets the limit back whenever one of Nova's steps
    is below it, and leaves the steps above it alone (reported as set by someone else)."""
    lab, nova = site.lab, site.nova
    home, away = lab.hosts[1].name, lab.hosts[2].name
    hot = nova.boot(HOT, home)
    site.ready(hot)
    nova.action(hot.id, {"os-migrateLive": {"host": away, "block_migration": "auto"}})
    source = agent(lab, home)
    wait_until(lambda: bool(_steps(nova)), 60, "Nova's first downtime step")
    before = len(_steps(nova))
    source.TuneMigration(
        pb.TuneMigrationRequest(domain_uuid=hot.id, max_downtime_ms=FLOOR_MS), timeout=T
    )
    stream = source.WatchMigration(
        pb.WatchMigrationRequest(domain_uuid=hot.id, interval_s=0.2, start_timeout_s=5),
        timeout=300,
    )
    samples: list[tuple[int, str]] = []
    try:
        for p in stream:
            samples.append((p.max_downtime_ms, p.max_downtime_set_by))
            if any(s > FLOOR_MS for s in _steps(nova, before)) and samples[-1][0] > FLOOR_MS:
                break
    finally:
        stream.cancel()
    steps = _steps(nova, before)
    below = [s for s in steps if s < FLOOR_MS]
    print(f"\nNova's steps after the floor: {steps}; limit, set by: {sorted(set(samples))}")
    assert len(below) >= 2, f"Nova stepped below the floor only {below}"
    # Each of Nova's lower steps shows for at most the one sample before the agent acts.
    assert sum(1 for v, _ in samples if v < FLOOR_MS) <= len(below), samples
    assert (FLOOR_MS, "hostmaint") in samples
    # Nova's first step above the floor stands, and is reported as someone else's.
    above = min(s for s in steps if s > FLOOR_MS)
    assert samples[-1] == (above, "external"), samples[-5:]

    record = running_migration(nova, hot)
    resp = nova.http.delete(f"{nova.url}/servers/{hot.id}/migrations/{record['id']}")
    assert resp.status_code == 202, resp.text
    _, status = settled(nova, hot, int(record["id"]), "error")
    assert status == "error" and nova.where(hot) == [home]
    assert_servers_memory_intact(nova, [hot])
