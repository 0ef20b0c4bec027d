"""Per-VM targets (a roll's plan) applied to a drain's candidate targets (pure).

``pin_targets(targets, pins)``: each target accepts a pinned VM only when it is that
VM's target; VMs not pinned keep what the targets accepted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from hostmaint.coordinator.model import TargetHost, VmSpec


def pin_targets(
    targets: Sequence[TargetHost], vms: Sequence[VmSpec], pins: Mapping[str, str]
) -> tuple[TargetHost, ...]:
    if not pins:
        return tuple(targets)
    out = []
    for t in targets:
        accepted = set(t.cpu_compatible) if t.cpu_compatible is not None else {v.uuid for v in vms}
        accepted -= {uuid for uuid, target in pins.items() if target != t.name}
        out.append(dataclasses.replace(t, cpu_compatible=frozenset(accepted)))
    return tuple(out)
