"""A cloud that marks a VM failed when its live migration is aborted, as Nova 34.0.0 does.

After an aborted live migration Nova's libvirt driver collects the migration
thread's "operation aborted" error and puts the server in vm_state error,
though its guest runs on, unmoved, on its host; Nova then refuses to migrate
it again (409). The coordinator clears that error before it retries, and
when it gives up, once the agents confirm where the guest runs; it never
resets a VM that its agents do not show running on its host.

The cloud is `SimDriver(error_after_abort=True)`, its agents `SimAgents`; the
one guest writes faster than any downtime limit allows and post-copy is not
allowed, so its ladder ends in abort every time.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hostmaint.coordinator import errors
from hostmaint.coordinator.drivers.base import InstanceState
from hostmaint.coordinator.executor import Executor, ExecutorSettings
from hostmaint.coordinator.journal import STEP_DONE, Journal, make_engine
from hostmaint.coordinator.model import GIB, MIB, DrainPolicy
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.onevm import LINK_BYTES_PER_S, SOURCE, one_vm_cloud
from tests.coordinator.simagents import Guest, SimAgent, SimAgents
from tests.coordinator.simdriver import SimDriver

VM = "stuck"
GUEST = Guest(2 * GIB, 1 * GIB, rate_bytes_per_s=10 * MIB)
POLICY = cpb.DrainPolicy(allow_postcopy=False)
WAIT_S = 30.0


class HiddenAgent(SimAgent):
    """A source agent that lists no guest once the cloud marked it failed."""

    def list_domains(self, uuids: list[str] | None = None) -> Any:
        if self.agents.driver.get_instance(VM).state is InstanceState.ERROR:
            raise errors.AgentRefused(self.host, "ListDomains", "NOT_FOUND", "no such domain")
        return super().list_domains(uuids)


class HiddenAgents(SimAgents):
    def client(self, host: str) -> SimAgent:
        return HiddenAgent(self, host) if host == SOURCE else super().client(host)


def _drain(
    tmp_path: Path, agents_type: type[SimAgents], error_delay_s: float = 0.0
) -> tuple[SimDriver, Journal, str]:
    driver, agents = one_vm_cloud(
        VM, GUEST, agents_type, error_after_abort=True, error_delay_s=error_delay_s
    )
    journal = Journal(make_engine(f"sqlite:///{tmp_path / 'journal.db'}"), clock=time.time)
    settings = ExecutorSettings(
        defaults=DrainPolicy(),
        link_bandwidth_bytes_per_s=LINK_BYTES_PER_S,
        watch_start_timeout_s=0.5,
        escalation_settle_s=0.3,
        stall_grace_s=0.5,
    )
    registry: Any = agents
    stopped = threading.Event()
    executor = Executor(driver, registry, journal, settings, clock=time.time, stopped=stopped)
    try:
        drain_id = executor.start_drain(SOURCE, POLICY, "firmware")
        assert executor.wait(drain_id, WAIT_S), "the drain did not end"
    finally:
        stopped.set()
    return driver, journal, drain_id


@pytest.mark.parametrize("error_delay_s", [0.0, 1.0])
def test_the_error_an_abort_leaves_is_cleared_before_each_retry_and_at_the_end(
    tmp_path: Path, error_delay_s: float
) -> None:
    """Also when the cloud marks the VM failed a moment after the migration ended, as
    Nova does: the last time there is no next start to be refused, so the coordinator
    waits for the error to show before it gives up."""
    driver, journal, drain_id = _drain(tmp_path, SimAgents, error_delay_s)
    row = journal.vm(drain_id, VM)
    assert (row.state, row.attempts) == ("failed", 2), row
    resets = [s for s in journal.steps(drain_id) if s.action == "reset_state"]
    if not error_delay_s:
        # One reset per abort: before the retry, and when it gave up.
        assert [(s.vm_uuid, s.state) for s in resets] == [(VM, STEP_DONE)] * 2
        assert driver.resets == [VM, VM]
    # The last reset came after the last abort: the VM was not left failed.
    aborts = [s for s in journal.steps(drain_id) if "abort" in str(s.detail.get("action", ""))]
    assert resets and aborts and resets[-1].id > aborts[-1].id, (aborts, resets)
    inst = driver.get_instance(VM)
    assert (inst.state, inst.host) == (InstanceState.ACTIVE, SOURCE)


def test_a_vm_its_agent_does_not_show_running_is_not_reset(tmp_path: Path) -> None:
    driver, journal, drain_id = _drain(tmp_path, HiddenAgents)
    row = journal.vm(drain_id, VM)
    # Failed at the first abort, with the reason; the cloud's error stays for an operator.
    assert (row.state, row.attempts) == ("failed", 1), row
    assert "not reset" in row.error and f"running on {SOURCE}: False" in row.error, row.error
    assert not [s for s in journal.steps(drain_id) if s.action == "reset_state"]
    assert driver.resets == []
    assert driver.get_instance(VM).state is InstanceState.ERROR
