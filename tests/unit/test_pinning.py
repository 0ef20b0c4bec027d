"""A roll's per-VM targets applied to a drain's candidate targets."""

from __future__ import annotations

from hostmaint.coordinator.model import GIB, TargetHost, VmSpec
from hostmaint.coordinator.pinning import pin_targets

VMS = [VmSpec(u, u, GIB) for u in ("a", "b", "c")]


def test_a_pinned_vm_is_accepted_by_its_target_only() -> None:
    targets = [
        TargetHost("t1", 64 * GIB, 64),
        TargetHost("t2", 64 * GIB, 64, cpu_compatible=frozenset({"a", "c"})),
    ]
    pinned = pin_targets(targets, VMS, {"a": "t1", "b": "t2"})
    assert [t.cpu_compatible for t in pinned] == [frozenset({"a", "c"}), frozenset({"c"})]
    # b's target does not run its CPU: no target takes it, the drain says so
    assert [t.free_memory_bytes for t in pinned] == [64 * GIB, 64 * GIB]


def test_no_pins_change_nothing() -> None:
    targets = [TargetHost("t1", 64 * GIB, 64)]
    assert pin_targets(targets, VMS, {}) == tuple(targets)
