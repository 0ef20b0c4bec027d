"""A running migration's prediction revised from its own rounds: journaled, in GetDrain,
and acted on by the ladder before the stall timeout."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from hostmaint.coordinator.executor import Executor, ExecutorSettings
from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.coordinator.model import GIB, MIB, DrainPolicy
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.onevm import LINK_BYTES_PER_S, SOURCE, one_vm_cloud
from tests.coordinator.simagents import Guest

VM = "hot"
# reported as a slow writer, so the plan expects it to converge at once; its job's rounds
# keep 900 MiB left at every sync: it will not converge as it runs
GUEST = Guest(4 * GIB, 2 * GIB, rate_bytes_per_s=1 * MIB, working_set_bytes=900 * MIB)
WAIT_S = 30.0


def test_rounds_that_stop_shrinking_are_journaled_shown_and_escalated_before_the_timeout(
    tmp_path: Path,
) -> None:
    driver, agents = one_vm_cloud(VM, GUEST)
    journal = Journal(make_engine(f"sqlite:///{tmp_path / 'journal.db'}"), clock=time.time)
    settings = ExecutorSettings(
        defaults=DrainPolicy(),
        link_bandwidth_bytes_per_s=LINK_BYTES_PER_S,
        poll_interval_s=0.05,
        stall_grace_s=600.0,  # the stall timeout never comes within the test
        escalation_settle_s=0.2,
        max_attempts=1,
    )
    registry: Any = agents
    stopped = threading.Event()
    executor = Executor(driver, registry, journal, settings, clock=time.time, stopped=stopped)

    def rounds() -> None:  # QEMU's syncs, one every 0.15 s once the job runs
        iteration = 1
        while not stopped.is_set():
            if agents.called("WatchMigration", VM):
                iteration += 1
                agents.set_round(VM, iteration)
            stopped.wait(0.15)

    threading.Thread(target=rounds, name="test-rounds", daemon=True).start()
    try:
        drain_id = executor.start_drain(SOURCE, cpb.DrainPolicy(allow_postcopy=False), "firmware")
        assert executor.wait(drain_id, WAIT_S), "the drain did not end"
        row = journal.vm(drain_id, VM)
        (vm,) = executor.status(drain_id).vms
    finally:
        stopped.set()
    assert row.revised_note.startswith("will not converge as it runs: its rounds stop"), row
    assert row.revised_total_s == 0.0
    assert (vm.revised_total_s, vm.revised_note) == (0.0, row.revised_note)
    # the ladder acted on it (the stall timeout is minutes away): raised, then aborted
    reasons = [
        s.detail.get("reason", "") for s in journal.steps(drain_id) if s.detail.get("action")
    ]
    assert reasons and all("stop shrinking" in r for r in reasons), reasons
    assert [a.split("=")[0] for a in row.tuning_applied] == ["raise_downtime", "abort"], row
    assert row.state == "failed"
