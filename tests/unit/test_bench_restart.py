"""tools/bench_restart_lab.py without a lab: where it kills the coordinator, how it reads
the restarted coordinator's first action, and its table."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb

MIB = 1024 * 1024


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "tools" / "bench_restart_lab.py"
    spec = importlib.util.spec_from_file_location("bench_restart_lab", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_restart_lab", module)
    spec.loader.exec_module(module)
    return module


def _progress(
    vm: str, iteration: int, processed_mib: int, postcopy: bool = False
) -> cpb.DrainEvent:
    phase = apb.MIGRATION_PHASE_POSTCOPY if postcopy else apb.MIGRATION_PHASE_PRECOPY
    return cpb.DrainEvent(
        kind=cpb.DRAIN_EVENT_KIND_PROGRESS,
        vm_uuid=vm,
        progress=apb.MigrationProgress(
            phase=phase, iteration=iteration, memory_processed_bytes=processed_mib * MIB
        ),
    )


def test_each_kill_point_fires_on_its_event_only() -> None:
    bench = _bench()
    plan = {
        "fast": cpb.PlannedMigration(vm_uuid="fast", tuning=cpb.TUNING_POSTCOPY),
        "db": cpb.PlannedMigration(vm_uuid="db", tuning=cpb.TUNING_NONE),
    }
    first, mid, after = (bench.KILL_POINTS[p] for p in ("first-pass", "mid-rounds", "after-switch"))
    assert first(_progress("fast", 1, 32), plan)
    assert not first(_progress("fast", 1, 1), plan)  # barely started
    assert not first(_progress("fast", 2, 300), plan)  # its first pass is over
    assert not first(_progress("db", 1, 32), plan)  # not planned for post-copy
    assert mid(_progress("db", 3, 100), plan)
    assert not mid(_progress("db", 2, 100), plan)
    assert not mid(_progress("fast", 5, 100, postcopy=True), plan)
    tuned = cpb.DrainEvent(kind=cpb.DRAIN_EVENT_KIND_TUNED, vm_uuid="fast")
    for message, fires in [
        ("postcopy: planned: post-copy after the first pass", True),
        ("hold_link=900: behind; holding the link for the switch-over", True),
        ("raise_downtime=800: elapsed 40s > 28s allowed", False),
    ]:
        tuned.message = message
        assert after(tuned, plan) is fires
    assert not after(_progress("fast", 2, 300), plan)


def test_the_first_action_is_read_from_the_restarted_coordinators_log(tmp_path: Path) -> None:
    bench = _bench()
    launched = time.mktime(time.strptime("2026-12-06 11:00:00", "%Y-%m-%d %H:%M:%S"))
    log = tmp_path / "c.log"
    log.write_text(
        "2026-12-06 11:00:01,100 INFO hostmaint.coordinator.cmd [MainThread] leader member=x\n"
        "2026-12-06 11:00:02,250 INFO hostmaint.coordinator.restart [drain/h0] "
        "re-attaching to migration vm=abc drain=12345678\n"
        "2026-12-06 11:00:03,000 INFO hostmaint.coordinator.events [migwatch/x] "
        "drain event drain=12345678 host=h0 kind=progress vm=abc \n"
    )
    assert abs(bench._first_action_s(log, launched) - 2.25) < 1e-6
    log.write_text("2026-12-06 11:00:01,100 INFO x [MainThread] leader member=x\n")
    assert bench._first_action_s(log, launched) is None


def test_the_table_compares_each_run_with_the_drain_not_killed() -> None:
    bench = _bench()
    rows = [
        bench.Row(
            "no-kill",
            makespan_s=50.0,
            migrating_s=20.0,
            attempts={"fast": 1},
            moved=4,
            state="completed",
        ),
        bench.Row(
            "mid-rounds",
            killed_at_s=20.0,
            killed_during="db",
            first_action_s=1.5,
            makespan_s=55.0,
            migrating_s=21.0,
            attempts={"fast": 1},
            moved=4,
            state="completed",
        ),
        bench.Row("after-switch", makespan_s=50.0, attempts={"fast": 1}, moved=4),
    ]
    lines = bench.render(rows).splitlines()
    assert len(lines) == 4
    assert lines[2].split()[:9] == [
        "mid-rounds",
        "20.0",
        "db",
        "1.5",
        "55.0",
        "1.10",
        "21.0",
        "1.05",
        "0",
    ]
    assert "not reached" in lines[3]
