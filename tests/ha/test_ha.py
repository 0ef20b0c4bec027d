"""Leader election and host locks through tooz on a real etcd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hostmaint.coordinator import ha_tooz
from tests.ha.etcdserver import EtcdServer

pytestmark = pytest.mark.etcd

ROOT = Path(__file__).resolve().parent.parent.parent


def wait_until(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.fixture
def members(etcd: EtcdServer, group: str) -> Iterator[list[ha_tooz.ToozCoordination]]:
    made = [
        ha_tooz.ToozCoordination(
            etcd.tooz_url, group, name, lease_ttl_s=3, heartbeat_interval_s=0.5
        )
        for name in ("a", "b")
    ]
    for m in made:
        m.start()
    yield made
    for m in made:
        m.stop()


def test_two_members_elect_one_leader(members: list[ha_tooz.ToozCoordination]) -> None:
    a, b = members
    assert [a.is_leader(), b.is_leader()] == [True, False]  # a started first
    assert a.members() == b.members() == {"a", "b"}
    assert a.lock_host("host1")
    assert not b.lock_host("host1")
    assert b.lock_host("host2")
    assert a.holds_host("host1") and not b.holds_host("host1")
    a.unlock_host("host1")
    assert b.lock_host("host1")


def test_a_stopped_leader_hands_over_at_once(members: list[ha_tooz.ToozCoordination]) -> None:
    a, b = members
    a.lock_host("host1")
    a.stop()
    members.remove(a)
    assert wait_until(b.is_leader, timeout_s=5)  # the next campaign, not a TTL
    assert b.lock_host("host1")
    assert b.members() == {"b"}


def test_standby_takes_over_when_the_leader_is_killed(etcd: EtcdServer, group: str) -> None:
    ttl_s, interval_s = 3, 0.5
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.ha.holder", etcd.tooz_url, group, "holder", "host1",
         str(ttl_s), str(interval_s)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    elected = threading.Event()
    standby = ha_tooz.ToozCoordination(
        etcd.tooz_url,
        group,
        "standby",
        lease_ttl_s=ttl_s,
        heartbeat_interval_s=interval_s,
        on_elected=elected.set,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "leading"
        standby.start()
        # The holder's heartbeats keep its leases for longer than one TTL.
        held_for_s = 2 * ttl_s
        assert not elected.wait(held_for_s)
        assert not standby.is_leader()
        assert not standby.lock_host("host1")

        holder.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        holder.wait()
        assert elected.wait(10 * ttl_s)
        leader_s = time.monotonic() - killed
        assert wait_until(lambda: standby.lock_host("host1"), timeout_s=10 * ttl_s)
        host_s = time.monotonic() - killed
        print(
            f"\ntakeover lease_ttl_s={ttl_s} heartbeat_interval_s={interval_s}: "
            f"leadership after {leader_s:.2f} s, host lock after {host_s:.2f} s"
        )
        assert standby.is_leader() and standby.holds_host("host1")
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
        standby.stop()


def test_a_lease_not_renewed_in_time_is_lost(etcd: EtcdServer, group: str) -> None:
    now = [0.0]
    lost: list[str] = []
    member = ha_tooz.ToozCoordination(
        etcd.tooz_url,
        group,
        "paused",
        lease_ttl_s=30,
        heartbeat_interval_s=10,  # the thread stays asleep during the test
        on_lost=lost.append,
        clock=lambda: now[0],
    )
    member.start()
    try:
        assert member.is_leader() and member.lock_host("host1")
        now[0] += 29.0
        member.heartbeat()  # renewed in time: valid for another TTL
        assert member.is_leader() and member.holds_host("host1")
        now[0] += 30.0  # a pause as long as the TTL: the service may have moved on
        assert not member.is_leader()
        member.heartbeat()
        assert sorted(lost) == ["host/host1", "leader"]
        assert not member.holds_host("host1")
    finally:
        member.stop()
