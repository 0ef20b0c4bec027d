"""Whether a drain cold-migrates the VMs that cannot move live is the driver's to say."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hostmaint.coordinator.agents import AgentRegistry
from hostmaint.coordinator.drivers.base import Instance, InstanceState
from hostmaint.coordinator.drivers.direct import DirectDriver
from hostmaint.coordinator.drivers.nova import NovaDriver
from hostmaint.coordinator.gather import Inputs
from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.coordinator.model import DrainPolicy, Link
from hostmaint.coordinator.runtime import ExecutorSettings, Runtime
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.simdriver import SimDriver, SimHost

VM = "00000000-0000-0000-0000-00000000c01d"


class ColdSimDriver(SimDriver):
    """The simulated cloud, claiming it can cold-migrate."""

    can_cold_migrate = True


@pytest.mark.parametrize(
    ("driver", "can"), [(DirectDriver, False), (NovaDriver, True), (SimDriver, False)]
)
def test_every_driver_says_whether_it_can_cold_migrate(driver: type, can: bool) -> None:
    assert driver.can_cold_migrate is can


@pytest.mark.parametrize(("driver", "cold"), [(SimDriver, False), (ColdSimDriver, True)])
def test_a_shut_off_vm_is_cold_migrated_only_through_a_driver_that_can(
    tmp_path: Path, driver: type[SimDriver], cold: bool
) -> None:
    off = Instance(VM, "off", "src", "p", InstanceState.SHUTOFF, None, "m1.small", 1, 1024)
    sim = driver(
        [SimHost("src", 64 * 1024, 64), SimHost("dst", 64 * 1024, 64)],
        [off],
        clock=lambda: 0.0,
        link=Link(1e9),
    )
    runtime = Runtime(
        sim,
        AgentRegistry({}, timeout_s=1.0, tls=None, clock=lambda: 0.0),
        Journal(make_engine(f"sqlite:///{tmp_path / 'j.db'}"), clock=lambda: 0.0),
        ExecutorSettings(defaults=DrainPolicy(), link_bandwidth_bytes_per_s=1e9),
        clock=lambda: 0.0,
        stopped=threading.Event(),
    )
    inputs = Inputs(host="src", vms=(), targets=(), not_live=(off,), link_bandwidth_bytes_per_s=1e9)
    policy = cpb.DrainPolicy(non_live_action=cpb.NON_LIVE_ACTION_COLD_MIGRATE)

    decision = runtime.non_live(off, inputs, policy)

    assert runtime.cold_migration_supported() is cold
    assert decision.cold is cold
    if not cold:
        assert "cannot cold-migrate" in decision.reason
