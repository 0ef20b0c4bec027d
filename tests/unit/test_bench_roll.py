"""A small instance of tools/bench_roll.py: a 20-host cloud rolled by hostmaint and naively."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from hostmaint.coordinator.roll import NO_HOST_DONE_REASON
from hostmaint.coordinator.rollaudit import replay_roll


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "tools" / "bench_roll.py"
    spec = importlib.util.spec_from_file_location("bench_roll", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_roll", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fill", [0.5, 0.85])
def test_a_20_host_roll_moves_each_vm_once_but_the_first_hosts(fill: float) -> None:
    bench = _bench()
    row = bench.run_row(20, fill, wave_share=0.1)
    cloud = row.cloud
    assert row.vms == sum(len(h.vms) for h in cloud.hosts) > 200
    assert row.violations == ()  # both rolls: no host over capacity, hard groups kept
    for plan, per_wave in ((row.roll, row.max_hosts_per_wave), (row.naive, 1)):
        audit = replay_roll(cloud.hosts, plan, per_wave)
        assert audit.violations == ()
        assert audit.memory_fill_peak <= 1.0 and audit.vcpu_fill_peak <= 1.0
        assert plan.memory_fill_peak == pytest.approx(audit.memory_fill_peak)
        assert sorted(u for u, _ in plan.placement) == sorted(
            v.uuid for h in cloud.hosts for v in h.vms
        )
    roll = row.roll
    # at most one move per VM but for the first host's, which no done host can take yet:
    # the fewest any roll makes
    assert roll.moves_per_vm == pytest.approx(row.moves_bound)
    assert roll.moves_per_vm < 1.05
    moves = Counter(m.vm_uuid for m in roll.moves)
    first = {v.uuid for h in cloud.hosts if h.name in roll.waves[0].hosts for v in h.vms}
    assert {u for u, n in moves.items() if n > 1} == first == {p.vm_uuid for p in roll.parked}
    assert all(p.reason == NO_HOST_DONE_REASON for p in roll.parked)
    assert max(moves.values()) == 2
    assert roll.moves_per_vm < row.naive.moves_per_vm
    assert roll.predicted_s < row.naive.predicted_s
    assert max(len(w.hosts) for w in roll.waves) == row.max_hosts_per_wave == 2
    line = bench.format_row(row)
    assert line.startswith("   20") and line.rstrip().split()[-2] == "ok"
