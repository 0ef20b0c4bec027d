"""The roll's state while it is planned (pure: no I/O, no clock): where every VM is, each
host's use, and why a host refuses a VM (capacity, hard server-group rules).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from hostmaint.coordinator.model import VmSpec
from hostmaint.coordinator.rolltypes import (
    GROUP_POLICIES,
    HARD_AFFINITY,
    HARD_ANTI_AFFINITY,
    SOFT_AFFINITY,
    SOFT_ANTI_AFFINITY,
    RollHost,
)


@dataclass(frozen=True)
class Unit:
    """VMs that move together (a hard-affinity group's members on one host), as one."""

    vms: tuple[VmSpec, ...]
    memory_bytes: int
    vcpus: int
    anti: frozenset[str]  # hard anti-affinity groups
    affinity: tuple[tuple[str, int], ...]  # hard-affinity groups, members in the unit
    soft_anti: frozenset[str]
    soft_affinity: tuple[tuple[str, int], ...]

    @staticmethod
    def of(vms: Sequence[VmSpec]) -> Unit:
        def groups(policy: str) -> Counter[str]:
            return Counter(g.id for v in vms for g in v.server_groups if g.policy == policy)

        return Unit(
            vms=tuple(sorted(vms, key=lambda v: v.uuid)),
            memory_bytes=sum(v.memory_bytes for v in vms),
            vcpus=sum(v.vcpus for v in vms),
            anti=frozenset(groups(HARD_ANTI_AFFINITY)),
            affinity=tuple(sorted(groups(HARD_AFFINITY).items())),
            soft_anti=frozenset(groups(SOFT_ANTI_AFFINITY)),
            soft_affinity=tuple(sorted(groups(SOFT_AFFINITY).items())),
        )


class Cloud:
    """Where every VM is, and each host's use: the roll's state while it is planned."""

    def __init__(self, hosts: Sequence[RollHost]) -> None:
        validate(hosts)
        self.names = sorted(h.name for h in hosts)
        self.cap_mem = {h.name: h.memory_capacity_bytes for h in hosts}
        self.cap_cpu = {h.name: h.vcpu_capacity for h in hosts}
        self.used_mem = {h.name: h.memory_overhead_bytes for h in hosts}
        self.used_cpu = dict.fromkeys(self.cap_mem, 0)
        self.vms: dict[str, dict[str, VmSpec]] = {h.name: {} for h in hosts}
        self.members: dict[str, Counter[str]] = {h.name: Counter() for h in hosts}
        self.group_total: Counter[str] = Counter()
        self.moves: Counter[str] = Counter()  # per VM uuid
        for h in hosts:
            for vm in sorted(h.vms, key=lambda v: v.uuid):
                self._add(vm, h.name)
                self.group_total.update(g.id for g in vm.server_groups)

    def _add(self, vm: VmSpec, host: str) -> None:
        self.vms[host][vm.uuid] = vm
        self.used_mem[host] += vm.memory_bytes
        self.used_cpu[host] += vm.vcpus
        self.members[host].update(g.id for g in vm.server_groups)

    def _remove(self, vm: VmSpec, host: str) -> None:
        del self.vms[host][vm.uuid]
        self.used_mem[host] -= vm.memory_bytes
        self.used_cpu[host] -= vm.vcpus
        self.members[host].subtract(g.id for g in vm.server_groups)

    def move(self, unit: Unit, source: str, target: str) -> None:
        for vm in unit.vms:
            self._remove(vm, source)
            self._add(vm, target)

    def units(self, host: str) -> list[Unit]:
        """The host's VMs as units (hard-affinity groups whole), largest first."""
        vms = list(self.vms[host].values())
        parent = list(range(len(vms)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        first: dict[str, int] = {}
        for i, vm in enumerate(vms):
            for g in vm.server_groups:
                if g.policy == HARD_AFFINITY:
                    parent[root(i)] = root(first.setdefault(g.id, i))
        comps: dict[int, list[VmSpec]] = {}
        for i, vm in enumerate(vms):
            comps.setdefault(root(i), []).append(vm)
        units = [Unit.of(c) for c in comps.values()]
        return sorted(units, key=unit_order)

    def refusal(self, unit: Unit, host: str) -> str | None:
        """Why ``host`` cannot take ``unit`` (None: it can)."""
        if self.used_mem[host] + unit.memory_bytes > self.cap_mem[host]:
            return "memory"
        if self.used_cpu[host] + unit.vcpus > self.cap_cpu[host]:
            return "vCPUs"
        here = self.members[host]
        if any(here[g] > 0 for g in unit.anti):
            return "anti-affinity"
        for g, n in unit.affinity:
            others = self.group_total[g] - n
            if others and here[g] != others:
                return "affinity"
        return None

    def soft_conflicts(self, unit: Unit, host: str) -> int:
        here = self.members[host]
        cost = sum(here[g] for g in unit.soft_anti)
        return cost + sum(
            1 for g, n in unit.soft_affinity if self.group_total[g] > n and here[g] == 0
        )

    def memory_fill(self, host: str, extra_bytes: int = 0) -> float:
        cap = self.cap_mem[host]
        return (self.used_mem[host] + extra_bytes) / cap if cap else 0.0

    def vcpu_fill(self, host: str, extra: int = 0) -> float:
        cap = self.cap_cpu[host]
        return (self.used_cpu[host] + extra) / cap if cap else 0.0

    def vm_memory(self, host: str) -> int:
        return sum(v.memory_bytes for v in self.vms[host].values())

    def free_memory(self, host: str) -> int:
        return self.cap_mem[host] - self.used_mem[host]

    def fill_peaks(self) -> tuple[float, float]:
        return (
            max((self.memory_fill(h) for h in self.names), default=0.0),
            max((self.vcpu_fill(h) for h in self.names), default=0.0),
        )


def unit_order(u: Unit) -> tuple[int, int, int, str]:
    """The most constrained first (hard groups: fewer hosts can take it), then the largest."""
    return (-len(u.anti) - len(u.affinity), -u.memory_bytes, -u.vcpus, u.vms[0].uuid)


def validate(hosts: Sequence[RollHost]) -> None:
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise ValueError("host names repeat")
    uuids = [v.uuid for h in hosts for v in h.vms]
    if len(set(uuids)) != len(uuids):
        raise ValueError("a VM is listed twice")
    policy: dict[str, str] = {}
    hosts_of: dict[str, list[str]] = {}
    for h in hosts:
        if h.memory_capacity_bytes < 0 or h.pcpus < 0 or h.cpu_allocation_ratio < 0:
            raise ValueError(f"host {h.name}: negative capacity")
        used = h.memory_overhead_bytes + sum(v.memory_bytes for v in h.vms)
        if used > h.memory_capacity_bytes or sum(v.vcpus for v in h.vms) > h.vcpu_capacity:
            raise ValueError(f"host {h.name} is over its capacity already")
        for vm in h.vms:
            for g in vm.server_groups:
                if g.policy not in GROUP_POLICIES:
                    raise ValueError(f"server group {g.id}: unknown policy {g.policy!r}")
                if policy.setdefault(g.id, g.policy) != g.policy:
                    raise ValueError(f"server group {g.id} has two policies")
                hosts_of.setdefault(g.id, []).append(h.name)
    for gid, where in sorted(hosts_of.items()):
        if policy[gid] == HARD_AFFINITY and len(set(where)) > 1:
            raise ValueError(f"affinity group {gid} is split over hosts already")
        if policy[gid] == HARD_ANTI_AFFINITY and len(set(where)) < len(where):
            raise ValueError(f"anti-affinity group {gid} has members together already")
