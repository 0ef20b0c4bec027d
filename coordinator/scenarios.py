"""Seeded drain scenarios for the simulator and the benchmark (pure).

Public API
----------
``Scenario``: name, seed, the true VMs (``truth``: what the simulator runs), what the
    agents report of them (``reported``), candidate ``targets``, the ``link`` and the
    ``policy``.
``make_scenario(name, seed, n_vms, link_gbit, mix, informed=False) -> Scenario`` with
    ``mix`` one of ``idle``, ``mixed``, ``heavy``: memory 1-64 GiB, dirty rates from idle
    to above the link, CPU-bound and paced writers. ``reported`` holds what the agents
    report today: memory, non-zero bytes, and the writer as the coordinator reads it from
    dirty-rate windows (``MEASURE_WINDOWS_S``, doubled up to ``MAX_MEASURE_WINDOW_S`` for
    fast writers; ``dirty.writer_of``: a working set smaller than a window's writes is
    found; found by the first two, its rate is unknown and assumed high); writer kind
    unknown; ``informed`` also reports the working set of 70 % of the VMs and the writer
    kind of 80 %, what an agent estimating them could add. The true VMs are the same.
``standard_scenarios(informed=False) -> list[Scenario]``: the benchmark's set (10 to 60
    VMs, 10 and 25 Gbit links).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from hostmaint.common.dirty import (
    LONGER_WINDOW_LINK_SHARE,
    Writer,
    next_window_s,
    readings_of,
    writer_of,
)
from hostmaint.coordinator.model import (
    GIB,
    MIB,
    DrainPolicy,
    Link,
    ServerGroup,
    TargetHost,
    VmSpec,
    WriterKind,
)

MEMORY_GIB = (1, 2, 2, 4, 4, 8, 8, 16, 32, 64)
MEASURE_WINDOWS_S = (1.0, 2.0)  # the coordinator's fresh dirty-rate windows before planning
MAX_MEASURE_WINDOW_S = 8.0  # ... and the longest it doubles them to while the set is unseen


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    truth: tuple[VmSpec, ...]
    reported: tuple[VmSpec, ...]
    targets: tuple[TargetHost, ...]
    link: Link
    policy: DrainPolicy


def _dirty(rng: random.Random, mix: str, link_bps: float) -> tuple[float, WriterKind]:
    roll = rng.random()
    idle, moderate = {"idle": (0.85, 0.13), "mixed": (0.5, 0.3), "heavy": (0.2, 0.35)}[mix]
    if roll < idle:
        return rng.uniform(0.0, 2.0) * MIB, WriterKind.PACED
    if roll < idle + moderate:
        return rng.uniform(10.0, 150.0) * MIB, rng.choice([WriterKind.CPU, WriterKind.PACED])
    # heavy: from a fifth of the link to above it
    return rng.uniform(0.2, 1.3) * link_bps, rng.choice([WriterKind.CPU, WriterKind.PACED])


def _measured(rate: float, working_set: float, nonzero: float, link_bps: float) -> Writer:
    """The writer as the coordinator reads it: two windows, then doubling ones (gather.py)."""
    windows = list(MEASURE_WINDOWS_S)
    min_rate = link_bps * LONGER_WINDOW_LINK_SHARE
    while True:
        readings = readings_of(rate, working_set, windows)
        longer = next_window_s(readings, nonzero, MAX_MEASURE_WINDOW_S, min_rate)
        if longer is None:
            return writer_of(readings)
        windows.append(longer)


def make_scenario(
    name: str, seed: int, n_vms: int, link_gbit: float, mix: str, informed: bool = False
) -> Scenario:
    rng = random.Random(seed)
    link_bps = link_gbit * 1e9 / 8
    stream_cap = 1.6e9 if link_gbit > 12 else None  # one TCP stream of QEMU's tops out
    link = Link(bandwidth_bytes_per_s=link_bps, max_stream_bytes_per_s=stream_cap)
    truth: list[VmSpec] = []
    reported: list[VmSpec] = []
    groups = [ServerGroup(f"sg-{i}", "anti-affinity") for i in range(3)]
    for i in range(n_vms):
        mem = rng.choice(MEMORY_GIB) * GIB
        nonzero = int(mem * rng.uniform(0.2, 0.9))
        rate, writer = _dirty(rng, mix, link_bps)
        ws = int(min(nonzero, max(64 * MIB, nonzero * rng.uniform(0.05, 0.5))))
        sg = (rng.choice(groups),) if rng.random() < 0.2 else ()
        vm = VmSpec(
            uuid=f"{name}-vm{i:03d}",
            name=f"vm{i:03d}",
            memory_bytes=mem,
            nonzero_bytes=nonzero,
            dirty_rate_bytes_per_s=rate,
            working_set_bytes=ws,
            writer=writer,
            vcpus=rng.choice((1, 2, 4, 8)),
            server_groups=sg,
        )
        truth.append(vm)
        seen = _measured(rate, ws, nonzero, link_bps)
        known_ws = rng.random() < 0.7 and informed  # drawn either way: the same truth
        known_writer = rng.random() < 0.8 and informed
        reported.append(
            dataclasses.replace(
                vm,
                dirty_rate_bytes_per_s=seen.rate_bytes_per_s,
                working_set_bytes=ws if known_ws else seen.working_set_bytes,
                dirty_rate_floor_bytes_per_s=None if known_ws else seen.rate_floor_bytes_per_s,
                writer=writer if known_writer else WriterKind.UNKNOWN,
            )
        )
    total_mem = sum(v.memory_bytes for v in truth)
    n_targets = max(4, min(8, n_vms // 6))
    targets = tuple(
        TargetHost(
            name=f"target-{j}",
            free_memory_bytes=int(total_mem * 1.6 / n_targets) + 64 * GIB,
            free_vcpus=4 * n_vms,
        )
        for j in range(n_targets)
    )
    policy = DrainPolicy(
        max_downtime_ms=500.0,
        max_parallel_per_source=4,
        max_parallel_per_target=2,
        allow_postcopy=True,
        allow_auto_converge=True,
    )
    return Scenario(name, seed, tuple(truth), tuple(reported), targets, link, policy)


def standard_scenarios(informed: bool = False) -> list[Scenario]:
    specs = [
        ("mixed-10g-a", 11, 30, 10.0, "mixed"),
        ("mixed-10g-b", 12, 60, 10.0, "mixed"),
        ("mixed-25g-a", 13, 40, 25.0, "mixed"),
        ("mixed-25g-b", 14, 20, 25.0, "mixed"),
        ("idle-10g", 15, 40, 10.0, "idle"),
        ("idle-25g", 16, 60, 25.0, "idle"),
        ("heavy-10g", 17, 10, 10.0, "heavy"),
        ("heavy-25g", 18, 24, 25.0, "heavy"),
    ]
    return [make_scenario(*s, informed=informed) for s in specs]
