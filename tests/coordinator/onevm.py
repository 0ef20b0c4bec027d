"""A simulated cloud of two hosts and one VM on the first, whose pre-copy never ends by
itself (a writer the test drives): the setting of the tests of one migration's fate."""

from __future__ import annotations

import time
from typing import Any

from hostmaint.coordinator.drivers.base import Instance, InstanceState
from hostmaint.coordinator.model import MIB, Link
from tests.coordinator.simagents import Guest, SimAgents
from tests.coordinator.simdriver import SimDriver, SimHost

LINK_BYTES_PER_S = 1.25e9
SOURCE, TARGET = "src", "dst"


def one_vm_cloud(
    vm: str, guest: Guest, agents_type: type[SimAgents] = SimAgents, **driver_options: Any
) -> tuple[SimDriver, SimAgents]:
    """The cloud (``driver_options`` go to the SimDriver) and its agents; the source's
    libvirt has no cgroup CPU controller, and the agents sample every 20 ms."""
    driver = SimDriver(
        [SimHost(SOURCE, 64 * 1024, 64), SimHost(TARGET, 64 * 1024, 64)],
        [
            Instance(
                vm, vm, SOURCE, "p", InstanceState.ACTIVE, None, "f", 2, guest.memory_bytes // MIB
            )
        ],
        clock=time.monotonic,
        link=Link(LINK_BYTES_PER_S),
        time_scale=0.01,
        precopy_never_ends={vm},
        **driver_options,
    )
    agents = agents_type(
        driver, {vm: guest}, LINK_BYTES_PER_S, no_cpu_controller={SOURCE}, sample_interval_s=0.02
    )
    return driver, agents
