"""Incoming migration copies left behind: which are stale, and the sweep that destroys them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hostmaint.agent import errors
from hostmaint.agent.cmd import Agent
from hostmaint.agent.stale import RAN_NS, IncomingSweeper, StaleIncoming
from hostmaint.agent.types import PausedIncoming
from tests.agent.conftest import FROZEN

UUID = "6f1f5c4e-4b8f-4f34-9d51-8d7e2f0a0a01"
LEFT = PausedIncoming(UUID, "big", job_active=False, persistent=False, vcpu_time_ns=0)


def test_a_copy_is_due_only_after_it_looked_stale_for_the_whole_grace() -> None:
    rule = StaleIncoming(grace_s=15.0)
    assert rule.due([LEFT], now=100.0) == []
    assert rule.due([LEFT], now=114.9) == []
    assert rule.due([LEFT], now=115.0) == [LEFT]


@pytest.mark.parametrize(
    "why",
    [
        {"job_active": True},  # an incoming migration still running (or a job held)
        {"persistent": True},  # defined here: somebody's VM, not a copy in transit
        {"vcpu_time_ns": RAN_NS},  # its guest ran here: a post-copy's half, say
    ],
)
def test_a_copy_that_may_be_the_vm_is_never_due(why: dict[str, object]) -> None:
    rule = StaleIncoming(grace_s=1.0)
    copy = replace(LEFT, **why)  # type: ignore[arg-type]
    assert rule.due([copy], now=0.0) == []
    assert rule.due([copy], now=1_000.0) == []


def test_a_copy_that_stops_looking_stale_starts_its_grace_again() -> None:
    rule = StaleIncoming(grace_s=10.0)
    rule.due([LEFT], now=0.0)
    rule.due([replace(LEFT, job_active=True)], now=5.0)  # a new migration took it over
    assert rule.due([LEFT], now=12.0) == []
    assert rule.due([LEFT], now=22.0) == [LEFT]


def test_a_grace_of_zero_destroys_nothing() -> None:
    rule = StaleIncoming(grace_s=0.0)
    assert rule.due([LEFT], now=0.0) == []
    assert rule.due([LEFT], now=1e9) == []


class FakeDriver:
    def __init__(self, copies: list[PausedIncoming]) -> None:
        self.copies = copies
        self.connected = True
        self.refusals = 0
        self.destroyed: list[str] = []

    def paused_incoming(self) -> list[PausedIncoming]:
        return list(self.copies)

    def discard_incoming(self, domain_uuid: str) -> None:
        if self.refusals:
            self.refusals -= 1
            raise errors.OperationRefused(
                domain_uuid, "destroy", "cannot acquire state change lock"
            )
        self.destroyed.append(domain_uuid)
        self.copies = [c for c in self.copies if c.domain_uuid != domain_uuid]


def sweeper(driver: FakeDriver, now: list[float]) -> IncomingSweeper:
    return IncomingSweeper(driver, StaleIncoming(15.0), clock=lambda: now[0], wait=lambda _s: False)


def test_the_sweep_destroys_a_copy_once_overdue_and_retries_a_refused_destroy() -> None:
    driver, now = FakeDriver([LEFT]), [0.0]
    sweep = sweeper(driver, now)
    assert sweep.sweep() == []
    driver.refusals = 1
    now[0] = 15.0
    assert sweep.sweep() == []  # refused: tried again at the next sweep
    now[0] = 18.0
    assert sweep.sweep() == [UUID]
    assert driver.destroyed == [UUID]
    assert sweep.sweep() == []


def test_the_sweep_does_nothing_while_libvirt_is_away_and_the_loop_survives_it() -> None:
    driver, now = FakeDriver([LEFT]), [100.0]
    driver.connected = False
    sweep = sweeper(driver, now)
    assert sweep.sweep() == []
    driver.paused_incoming = lambda: (_ for _ in ()).throw(  # type: ignore[method-assign]
        errors.HypervisorUnavailable("qemu:///system", "connection reset")
    )
    driver.connected = True  # the listing fails between the check and the call
    rounds = iter([False, False, True])
    sweep.run(lambda: next(rounds))  # it raises twice; the loop goes on
    assert driver.destroyed == []


def test_the_sweep_interval_follows_the_grace() -> None:
    driver = FakeDriver([])
    assert (
        IncomingSweeper(driver, StaleIncoming(120.0), lambda: 0.0, lambda _s: False).interval_s
        == 10
    )
    assert (
        IncomingSweeper(driver, StaleIncoming(8.0), lambda: 0.0, lambda _s: False).interval_s == 2
    )


def test_libvirt_lists_paused_domains_but_never_one_it_cannot_say_is_free_of_jobs(
    agent: Agent,
) -> None:
    """test:/// has no job API: its paused domain (reason unknown) counts as held by one."""
    listed = {c.domain_uuid: c for c in agent.driver.paused_incoming()}
    assert set(listed) == {FROZEN.uuid}
    assert listed[FROZEN.uuid].job_active and listed[FROZEN.uuid].persistent
    assert StaleIncoming(1.0).due(list(listed.values()), now=0.0) == []
    assert agent.sweeper.sweep() == []
