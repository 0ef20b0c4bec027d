"""Where each VM of a drain goes: capacity, CPU, post-copy and server groups (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hostmaint.coordinator.model import MIB, TargetHost, VmSpec


@dataclass(frozen=True)
class Unmovable:
    vm_uuid: str
    vm_name: str
    reason: str


def place(
    vm: VmSpec,
    targets: Sequence[TargetHost],
    used: dict[str, list[VmSpec]],
    needs_postcopy: bool = False,
) -> str | None | Unmovable:
    """The target with room and fit (and post-copy, for a VM only post-copy moves) whose
    soft group policies suffer least, then the one with most free memory."""
    if not targets:
        return None
    best: TargetHost | None = None
    best_key: tuple[int, int] | None = None  # (soft group conflicts, -free memory)
    why: list[str] = []
    together = _affinity_targets(vm, targets, used)
    for t in targets:
        placed = used[t.name]
        free_mem = t.free_memory_bytes - sum(p.memory_bytes for p in placed)
        free_cpu = t.free_vcpus - sum(p.vcpus for p in placed)
        if not t.healthy:
            why.append(f"{t.name}: unhealthy")
        elif free_mem < vm.memory_bytes:
            why.append(f"{t.name}: {free_mem // MIB} MiB free < {vm.memory_bytes // MIB} MiB")
        elif free_cpu < vm.vcpus:
            why.append(f"{t.name}: {free_cpu} vCPUs free < {vm.vcpus}")
        elif t.cpu_compatible is not None and vm.uuid not in t.cpu_compatible:
            refusal = dict(t.cpu_refusals).get(vm.uuid, "CPU model not supported")
            why.append(f"{t.name}: {refusal}")
        elif needs_postcopy and not t.capabilities.postcopy:
            why.append(f"{t.name}: no post-copy ({t.capabilities.postcopy_reason})")
        elif not _groups_ok(vm, t, placed):
            why.append(f"{t.name}: anti-affinity")
        elif together is not None and t.name not in together:
            why.append(f"{t.name}: affinity")
        else:
            key = (_soft_conflicts(vm, t, placed), -free_mem)
            if best_key is None or key < best_key:
                best, best_key = t, key
    if best is None:
        return Unmovable(
            vm.uuid,
            vm.name,
            "no target host with capacity, CPU and group fit (" + "; ".join(why) + ")",
        )
    return best.name


def _members(g_id: str, t: TargetHost, placed: Sequence[VmSpec]) -> int:
    """Members of group ``g_id`` on ``t``: already there (at least one) or placed by the plan."""
    there = 1 if g_id in t.server_groups else 0
    return there + sum(1 for p in placed if any(g.id == g_id for g in p.server_groups))


def _groups_ok(vm: VmSpec, t: TargetHost, placed: Sequence[VmSpec]) -> bool:
    """Hard anti-affinity: no other member of the group on the target."""
    return all(
        _members(g.id, t, placed) == 0 for g in vm.server_groups if g.policy == "anti-affinity"
    )


def _affinity_targets(
    vm: VmSpec, targets: Sequence[TargetHost], used: dict[str, list[VmSpec]]
) -> set[str] | None:
    """Hard affinity: the targets where the group's members are or go (None: any target)."""
    allowed: set[str] | None = None
    for g in vm.server_groups:
        if g.policy != "affinity":
            continue
        hosts = {t.name for t in targets if _members(g.id, t, used[t.name]) > 0}
        if hosts:
            allowed = hosts if allowed is None else allowed & hosts
    return allowed


def _soft_conflicts(vm: VmSpec, t: TargetHost, placed: Sequence[VmSpec]) -> int:
    """Soft policies, as a cost to minimise: members of a soft-anti-affinity group already on
    the target, and for a soft-affinity group a target without its members."""
    cost = 0
    for g in vm.server_groups:
        if g.policy == "soft-anti-affinity":
            cost += _members(g.id, t, placed)
        elif g.policy == "soft-affinity":
            cost += 0 if _members(g.id, t, placed) > 0 else 1
    return cost
