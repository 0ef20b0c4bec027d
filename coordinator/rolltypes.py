"""The values of a rolling maintenance (pure: no I/O, no clock): hosts and policy in,
the plan and its audit out. Planned in ``roll``, replayed in ``rollaudit``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hostmaint.coordinator.model import VmSpec

HARD_AFFINITY = "affinity"
HARD_ANTI_AFFINITY = "anti-affinity"
SOFT_AFFINITY = "soft-affinity"
SOFT_ANTI_AFFINITY = "soft-anti-affinity"
GROUP_POLICIES = (HARD_AFFINITY, HARD_ANTI_AFFINITY, SOFT_AFFINITY, SOFT_ANTI_AFFINITY)


@dataclass(frozen=True)
class RollHost:
    name: str
    memory_capacity_bytes: int  # what guests may use (after the host's own reservation)
    pcpus: int
    cpu_allocation_ratio: float = 1.0
    vms: tuple[VmSpec, ...] = ()
    # as the host reports it; the part beyond its VMs' memory (overheads) stays on the
    # host when they leave. None: the VMs' memory
    memory_used_bytes: int | None = None

    @property
    def vcpu_capacity(self) -> int:
        return math.floor(self.pcpus * self.cpu_allocation_ratio + 1e-9)

    @property
    def memory_overhead_bytes(self) -> int:
        if self.memory_used_bytes is None:
            return 0
        return max(0, self.memory_used_bytes - sum(v.memory_bytes for v in self.vms))


@dataclass(frozen=True)
class RollPolicy:
    max_hosts_per_wave: int = 1
    maintenance_s: float = 0.0  # patching and rebooting a wave's hosts, after their drain


@dataclass(frozen=True)
class DrainEstimate:
    time_s: float
    bytes_sent: float


# one host's drain predicted: the host, and each VM with its target
DrainPredictor = Callable[[str, Sequence[tuple[VmSpec, str]]], DrainEstimate]


@dataclass(frozen=True)
class RollMove:
    vm_uuid: str
    vm_name: str
    source: str
    target: str
    wave: int  # from 1
    nth: int  # the VM's first move, second, ...


@dataclass(frozen=True)
class Parked:
    """A VM sent to a host drained later in the roll: it moves again then."""

    vm_uuid: str
    vm_name: str
    wave: int
    source: str
    target: str
    reason: str


@dataclass(frozen=True)
class HostDrain:
    host: str
    moves: tuple[RollMove, ...]
    predicted_s: float
    bytes_sent: float


@dataclass(frozen=True)
class Wave:
    index: int  # from 1
    drains: tuple[HostDrain, ...]
    predicted_drain_s: float  # its longest host drain
    predicted_s: float  # with the maintenance
    memory_fill_peak: float  # the fullest host at the end of the wave (used / capacity)
    vcpu_fill_peak: float

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(d.host for d in self.drains)

    @property
    def bytes_sent(self) -> float:
        return sum(d.bytes_sent for d in self.drains)


@dataclass(frozen=True)
class RollPlan:
    strategy: str
    waves: tuple[Wave, ...]
    parked: tuple[Parked, ...]
    vm_count: int
    placement: tuple[tuple[str, str], ...]  # (VM uuid, host) at the end, by uuid
    memory_fill_peak: float  # the fullest any host is, from the start to the end
    vcpu_fill_peak: float

    @property
    def moves(self) -> tuple[RollMove, ...]:
        return tuple(m for w in self.waves for d in w.drains for m in d.moves)

    @property
    def moves_per_vm(self) -> float:
        return len(self.moves) / self.vm_count if self.vm_count else 0.0

    @property
    def predicted_s(self) -> float:
        return sum(w.predicted_s for w in self.waves)

    @property
    def bytes_sent(self) -> float:
        return sum(w.bytes_sent for w in self.waves)

    @property
    def host_order(self) -> tuple[tuple[str, ...], ...]:
        return tuple(w.hosts for w in self.waves)


@dataclass(frozen=True)
class RollAudit:
    memory_fill_peak: float
    vcpu_fill_peak: float
    violations: tuple[str, ...]


class RollInfeasible(Exception):
    """No host can take a VM without breaking capacity or a hard server-group rule."""

    def __init__(self, host: str, vm_uuid: str, reason: str) -> None:
        super().__init__(f"host {host}: VM {vm_uuid} has nowhere to go ({reason})")
        self.host = host
        self.vm_uuid = vm_uuid
        self.reason = reason
