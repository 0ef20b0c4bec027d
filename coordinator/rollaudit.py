"""A roll plan replayed from the hosts as given (pure: no I/O, no clock): the fullest any
host gets, and every rule the plan breaks.
"""

from __future__ import annotations

from collections.abc import Sequence

from hostmaint.coordinator.rolltypes import (
    HARD_AFFINITY,
    HARD_ANTI_AFFINITY,
    RollAudit,
    RollHost,
    RollPlan,
)


def replay_roll(
    hosts: Sequence[RollHost], plan: RollPlan, max_hosts_per_wave: int | None = None
) -> RollAudit:
    """Replay ``plan`` from ``hosts`` wave by wave: the fullest any host gets (memory and
    vCPUs, used over capacity, at the end of each wave and at the start) and every rule
    broken: a host over capacity, a hard server-group rule broken, a VM moved from where
    it is not, to a host of its own wave, a host drained twice or never, a host left
    with VMs after its wave, a wave larger than ``max_hosts_per_wave``."""
    where = {v.uuid: h.name for h in hosts for v in h.vms}
    vm_of = {v.uuid: v for h in hosts for v in h.vms}
    by_name = {h.name: h for h in hosts}
    overhead = {h.name: h.memory_overhead_bytes for h in hosts}
    bad: list[str] = []
    peaks = [(0.0, 0.0)]

    def check(label: str) -> None:
        mem = dict(overhead)
        cpu = dict.fromkeys(by_name, 0)
        groups: dict[tuple[str, str], list[str]] = {}
        for uuid, at in where.items():
            mem[at] += vm_of[uuid].memory_bytes
            cpu[at] += vm_of[uuid].vcpus
            for group in vm_of[uuid].server_groups:
                groups.setdefault((group.policy, group.id), []).append(at)
        for name, host in by_name.items():
            cap_m, cap_c = host.memory_capacity_bytes, host.vcpu_capacity
            if mem[name] > cap_m or cpu[name] > cap_c:
                bad.append(f"{label}: host {name} over capacity")
            peaks.append((mem[name] / cap_m if cap_m else 0.0, cpu[name] / cap_c if cap_c else 0.0))
        for (policy, gid), at_hosts in groups.items():
            if policy == HARD_ANTI_AFFINITY and len(set(at_hosts)) < len(at_hosts):
                bad.append(f"{label}: anti-affinity group {gid} has members together")
            if policy == HARD_AFFINITY and len(set(at_hosts)) > 1:
                bad.append(f"{label}: affinity group {gid} is split")

    check("start")
    seen: set[str] = set()
    for w in plan.waves:
        label = f"wave {w.index}"
        if max_hosts_per_wave is not None and len(w.hosts) > max_hosts_per_wave:
            bad.append(f"{label}: {len(w.hosts)} hosts at once")
        if seen & set(w.hosts):
            bad.append(f"{label}: a host is drained twice")
        seen |= set(w.hosts)
        for m in (m for d in w.drains for m in d.moves):
            if where.get(m.vm_uuid) != m.source:
                bad.append(f"{label}: {m.vm_uuid} is not on {m.source}")
            if m.target in w.hosts or m.target not in by_name:
                bad.append(f"{label}: {m.vm_uuid} sent to {m.target}")
            where[m.vm_uuid] = m.target
        left = [u for u, h in where.items() if h in w.hosts]
        if left:
            bad.append(f"{label}: {len(left)} VMs left on its hosts")
        check(label)
    if seen != set(by_name):
        bad.append(f"hosts never drained: {sorted(set(by_name) - seen)}")
    return RollAudit(max(p[0] for p in peaks), max(p[1] for p in peaks), tuple(bad))
