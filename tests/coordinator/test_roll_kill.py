"""A coordinator process SIGKILLed mid-roll, twice, and started again on its journal:
once while a host drains, once while a hook runs. The cloud outlives it
(`FileSimDriver`); hooks are shell scripts writing to a file. No VM moves more often than
the plan says (its parked VMs twice, the others once), no migration is started twice,
and no hook runs twice for a host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hostmaint.coordinator.model import Link
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc
from tests.coordinator.filesimdriver import FileSimDriver
from tests.coordinator.rollworld import (
    HOSTS,
    LINK_BYTES_PER_S,
    WAIT_S,
    cloud,
    planned_moves,
    wait_until,
    write_hook,
)

ROOT = Path(__file__).resolve().parent.parent.parent


class Coordinators:
    """Coordinator processes on one work directory, one at a time."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.started = 0

    def start(self) -> coordinator_pb2_grpc.CoordinatorStub:
        self.started += 1
        log = (self.workdir / f"coordinator-{self.started}.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.coordinator.rollchild", str(self.workdir)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        return coordinator_pb2_grpc.CoordinatorStub(channel)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def hook_runs(self) -> Counter[str]:
        log = self.workdir / "hooks" / "ran.log"
        lines = log.read_text().split("\n") if log.exists() else []
        return Counter(line.split()[0] for line in lines if line)

    def cloud(self) -> FileSimDriver:
        hosts, instances, _ = cloud()
        return FileSimDriver(
            self.workdir / "cloud.pickle", hosts, instances, link=Link(LINK_BYTES_PER_S)
        )


@pytest.fixture
def coordinators(tmp_path: Path) -> Iterator[Coordinators]:
    write_hook(tmp_path / "hooks")
    c = Coordinators(tmp_path)
    try:
        yield c
    finally:
        (tmp_path / "hooks" / "hold").unlink(missing_ok=True)
        if c.proc is not None:
            c.kill()


def roll_state(stub: coordinator_pb2_grpc.CoordinatorStub, roll_id: str) -> cpb.RollStatus:
    return stub.GetRoll(cpb.GetRollRequest(roll_id=roll_id), timeout=10)


def test_sigkill_mid_roll_moves_no_vm_twice_and_runs_no_hook_twice(
    coordinators: Coordinators,
) -> None:
    hold = coordinators.workdir / "hooks" / "hold"
    stub = coordinators.start()
    request = cpb.RollRequest(hosts=list(HOSTS), max_hosts_per_wave=1, hook="patch")
    roll_id = ""
    first_plan = cpb.RollPlan()
    for event in stub.Roll(request, timeout=WAIT_S):
        roll_id = roll_id or event.roll_id
        if event.kind == cpb.ROLL_EVENT_KIND_PLANNED:
            first_plan.CopyFrom(event.plan)
        if event.kind == cpb.ROLL_EVENT_KIND_DRAIN_STARTED and event.wave == 2:
            break
    draining = first_plan.waves[1].hosts[0].host
    coordinators.kill()  # 1: while the second wave's host drains
    assert coordinators.hook_runs() == Counter({first_plan.waves[0].hosts[0].host: 1})

    hold.touch()
    stub = coordinators.start()
    wait_until(
        f"the hook of {draining} runs",
        lambda: coordinators.hook_runs()[draining] == 1,
    )
    coordinators.kill()  # 2: while that host's hook runs
    hold.unlink()

    stub = coordinators.start()
    wait_until(
        "the roll stops for the operator",
        lambda: roll_state(stub, roll_id).state == cpb.ROLL_STATE_STOPPED,
    )
    status = roll_state(stub, roll_id)
    failed = [h for h in status.hosts if h.state == cpb.ROLL_HOST_STATE_FAILED]
    assert [(h.host, h.step) for h in failed] == [(draining, "hook")]
    assert "did not finish before the coordinator stopped" in failed[0].error
    events = list(
        stub.ResumeRoll(cpb.ResumeRollRequest(roll_id=roll_id, hook_done=True), timeout=WAIT_S)
    )
    assert events[-1].kind == cpb.ROLL_EVENT_KIND_FINISHED
    status = events[-1].status
    assert status.state == cpb.ROLL_STATE_COMPLETED, status.message
    coordinators.kill()

    cloud = coordinators.cloud()
    moves = Counter(m.instance_uuid for m in cloud.moves())
    assert moves == planned_moves(status.plan)
    assert sum(moves.values()) == sum(planned_moves(first_plan).values())
    assert cloud.migrations_started == sum(moves.values())  # none started twice
    assert coordinators.hook_runs() == Counter(HOSTS)  # each hook once
    assert all(cloud.host_enabled(h) for h in HOSTS)
