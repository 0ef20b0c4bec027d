"""How drains are done today, as simulator strategies (pure).

Public API
----------
``nova_default(vms)``    ``nova host-evacuate-live``: one migration at a time
    (``max_concurrent_live_migrations=1``), listing order, Nova's downtime steps
    (``live_migration_downtime`` 500 ms, 10 steps, 75 s delay per GiB of RAM, RAM counted
    as at least 2 GiB), completion timeout 800 s per GiB then abort; no auto-converge,
    no post-copy.
``nova_hardened(vms)``   the same with post-copy and auto-converge permitted (Nova then
    uses post-copy and not auto-converge), ``live_migration_timeout_action=force_complete``
    and a completion timeout of 15 s per GiB: stalled migrations switch to post-copy.
``kubevirt_default(vms)`` 2 parallel outbound migrations per node, QEMU's 300 ms downtime
    limit, no auto-converge, no post-copy, abort after 150 s without progress or after
    150 s per GiB.
``all_parallel(vms)``    Nova's default controller but every VM started at once.
Each returns a ``QueueStrategy`` for ``simulator.simulate``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hostmaint.coordinator.convergence import Migration
from hostmaint.coordinator.model import GIB, Settings, VmSpec
from hostmaint.coordinator.simulator import Job


@dataclass(frozen=True)
class NovaConf:
    downtime_ms: float = 500.0
    downtime_steps: int = 10
    downtime_delay_s_per_gib: float = 75.0
    completion_timeout_s_per_gib: float = 800.0
    timeout_action: str = "abort"  # or "force_complete"
    permit_postcopy: bool = False
    permit_auto_converge: bool = False


def nova_data_gib(vm: VmSpec) -> float:
    return max(2.0, vm.memory_bytes / GIB)


def downtime_steps(conf: NovaConf, data_gib: float) -> list[tuple[float, float]]:
    """(seconds after start, downtime ms) pairs, as Nova's linear steps."""
    delay = int(conf.downtime_delay_s_per_gib * data_gib)
    base = conf.downtime_ms / conf.downtime_steps
    offset = (conf.downtime_ms - base) / conf.downtime_steps
    return [
        (float(delay * i), float(int(base + offset * i))) for i in range(conf.downtime_steps + 1)
    ]


class QueueStrategy:
    """Start VMs in a fixed order up to ``max_parallel`` at once; steer them by timers."""

    def __init__(self, name: str, vms: Sequence[VmSpec], max_parallel: int) -> None:
        self.name = name
        self.queue = list(vms)
        self.max_parallel = max_parallel

    def remaining(self) -> int:
        return len(self.queue)

    def settings_for(self, vm: VmSpec) -> Settings:
        return Settings(downtime_limit_ms=300.0)

    def next_jobs(self, now_s: float, running: Sequence[Migration]) -> list[Job]:
        jobs: list[Job] = []
        while self.queue and len(running) + len(jobs) < self.max_parallel:
            vm = self.queue.pop(0)
            jobs.append(Job(vm, self.settings_for(vm)))
        return jobs

    def next_control_s(self, mig: Migration) -> float:
        return math.inf

    def control(self, mig: Migration, now_s: float) -> None:
        return None


class NovaStrategy(QueueStrategy):
    def __init__(
        self, name: str, vms: Sequence[VmSpec], conf: NovaConf, max_parallel: int = 1
    ) -> None:
        super().__init__(name, vms, max_parallel)
        self.conf = conf
        self.timed_out: set[str] = set()  # VM uuids (an id() is reused once freed)

    def settings_for(self, vm: VmSpec) -> Settings:
        first = downtime_steps(self.conf, nova_data_gib(vm))[0][1]
        postcopy = self.conf.permit_postcopy
        # Nova does not use auto-converge when post-copy is permitted and available.
        auto = self.conf.permit_auto_converge and not postcopy
        return Settings(downtime_limit_ms=first, auto_converge=auto, postcopy_permitted=postcopy)

    def _timeout_s(self, mig: Migration) -> float:
        return self.conf.completion_timeout_s_per_gib * nova_data_gib(mig.vm)

    def next_control_s(self, mig: Migration) -> float:
        if not mig.in_precopy:
            return math.inf
        elapsed_next = math.inf
        for at_s, limit_ms in downtime_steps(self.conf, nova_data_gib(mig.vm)):
            if limit_ms > mig.downtime_limit_ms:
                elapsed_next = at_s
                break
        if mig.vm.uuid not in self.timed_out and self.conf.completion_timeout_s_per_gib > 0:
            elapsed_next = min(elapsed_next, self._timeout_s(mig))
        return mig.start_s + elapsed_next

    def control(self, mig: Migration, now_s: float) -> None:
        elapsed = now_s - mig.start_s + 1e-9
        for at_s, limit_ms in downtime_steps(self.conf, nova_data_gib(mig.vm)):
            if at_s <= elapsed and limit_ms > mig.downtime_limit_ms:
                mig.set_downtime_limit(limit_ms)
        if mig.vm.uuid in self.timed_out or elapsed < self._timeout_s(mig):
            return
        self.timed_out.add(mig.vm.uuid)
        if self.conf.timeout_action == "force_complete":
            if not mig.start_postcopy():
                mig.pause()
        else:
            mig.abort()


class KubeVirtStrategy(QueueStrategy):
    def __init__(
        self,
        vms: Sequence[VmSpec],
        max_parallel: int = 2,
        progress_timeout_s: float = 150.0,
        completion_timeout_s_per_gib: float = 150.0,
    ) -> None:
        super().__init__("kubevirt", vms, max_parallel)
        self.progress_timeout_s = progress_timeout_s
        self.completion_timeout_s_per_gib = completion_timeout_s_per_gib

    def next_control_s(self, mig: Migration) -> float:
        if not mig.in_precopy:
            return math.inf
        completion = mig.start_s + self.completion_timeout_s_per_gib * max(
            1.0, mig.vm.memory_bytes / GIB
        )
        return min(mig.last_progress_s + self.progress_timeout_s, completion)

    def control(self, mig: Migration, now_s: float) -> None:
        if now_s + 1e-9 >= self.next_control_s(mig):
            mig.abort()


def nova_default(vms: Sequence[VmSpec]) -> NovaStrategy:
    return NovaStrategy("nova-default", vms, NovaConf())


def nova_hardened(vms: Sequence[VmSpec]) -> NovaStrategy:
    conf = NovaConf(
        completion_timeout_s_per_gib=15.0,
        timeout_action="force_complete",
        permit_postcopy=True,
        permit_auto_converge=True,
    )
    return NovaStrategy("nova-hardened", vms, conf)


def kubevirt_default(vms: Sequence[VmSpec]) -> KubeVirtStrategy:
    return KubeVirtStrategy(vms)


def all_parallel(vms: Sequence[VmSpec]) -> NovaStrategy:
    return NovaStrategy("all-parallel", vms, NovaConf(), max_parallel=max(1, len(vms)))
