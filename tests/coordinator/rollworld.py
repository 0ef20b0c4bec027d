"""A simulated cloud for rolls: `SimDriver` hosts and VMs, `SimAgents`, an executor and
`Rolls` on a journal; hooks are shell scripts in the test's hook directory that write
what they did to a file.

Four hosts of 16 GiB; h1 and h2 hold two 2 GiB VMs each, h3 and h4 one each. The
coordinator (executor and rolls) can be stopped and another one built on the same
journal, as a restart.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostmaint.coordinator.drivers.base import Instance, InstanceState
from hostmaint.coordinator.executor import Executor, ExecutorSettings
from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.coordinator.model import GIB, MIB, DrainPolicy, Link
from hostmaint.coordinator.rollrun import Rolls, RollSettings
from hostmaint.protos import coordinator_pb2 as cpb
from tests.coordinator.simagents import Guest, SimAgents
from tests.coordinator.simdriver import SimDriver, SimHost

LINK_BYTES_PER_S = 1.25e9
POLL_S = 0.05
WAIT_S = 30.0
HOSTS = ("h1", "h2", "h3", "h4")
VMS_PER_HOST = {"h1": 2, "h2": 2, "h3": 1, "h4": 1}

# The hook: appends "<host> <roll id>" to ran.log; exits 3 for a host named in fail,
# and waits while a file hold exists (the test removes it to let it finish).
HOOK = """#!/bin/sh
dir=$(dirname "$0")
echo "$1 $HOSTMAINT_ROLL_ID" >> "$dir/ran.log"
echo "patched $1"
while [ -e "$dir/hold" ]; do sleep 0.02; done
if grep -qx "$1" "$dir/fail" 2>/dev/null; then echo "patch of $1 failed" >&2; exit 3; fi
exit 0
"""


def vm_uuid(host: str, i: int) -> str:
    return f"{int(host[1:]):08x}-0000-4000-8000-{i:012x}"


def wait_until(what: str, condition: Callable[[], object], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(POLL_S / 2)


@dataclass
class RollWorld:
    tmp: Path
    driver: SimDriver
    agents: SimAgents
    hook_dir: Path
    db_url: str
    stops: list[threading.Event] = field(default_factory=list)

    def coordinator(self, back_timeout_s: float = 5.0) -> tuple[Executor, Rolls]:
        """A coordinator on the journal (a new process after a restart)."""
        stopped = threading.Event()
        self.stops.append(stopped)
        journal = Journal(make_engine(self.db_url), clock=time.time)
        registry: Any = self.agents  # the registry's contract, in process
        executor = Executor(
            self.driver,
            registry,
            journal,
            ExecutorSettings(
                defaults=DrainPolicy(),
                link_bandwidth_bytes_per_s=LINK_BYTES_PER_S,
                poll_interval_s=POLL_S,
                watch_start_timeout_s=0.5,
            ),
            clock=time.time,
            stopped=stopped,
        )
        rolls = Rolls(
            executor,
            RollSettings(
                hook_dir=str(self.hook_dir),
                back_timeout_s=back_timeout_s,
                poll_interval_s=POLL_S,
            ),
            clock=time.time,
            stopped=stopped,
        )
        return executor, rolls

    def stop(self) -> None:
        """The coordinator goes away: its threads end, the journal stays."""
        self.stops[-1].set()

    def hook_runs(self) -> Counter[str]:
        log = self.hook_dir / "ran.log"
        lines = log.read_text().split("\n") if log.exists() else []
        return Counter(line.split()[0] for line in lines if line)

    def fail_hook_on(self, *hosts: str) -> None:
        (self.hook_dir / "fail").write_text("".join(f"{h}\n" for h in hosts))

    def hold_hooks(self, hold: bool) -> None:
        path = self.hook_dir / "hold"
        if hold:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def moves(self) -> Counter[str]:
        return Counter(m.instance_uuid for m in self.driver.moves())


def cloud() -> tuple[list[SimHost], list[Instance], dict[str, Guest]]:
    """The hosts, the VMs and their guests, as every coordinator of the test builds them."""
    hosts = [SimHost(h, 16 * 1024, 32) for h in HOSTS]
    guests: dict[str, Guest] = {}
    instances = []
    for h, n in VMS_PER_HOST.items():
        for i in range(n):
            uuid = vm_uuid(h, i)
            guests[uuid] = Guest(2 * GIB, GIB, rate_bytes_per_s=1 * MIB)
            instances.append(
                Instance(uuid, f"vm-{h}-{i}", h, "p", InstanceState.ACTIVE, None, "f", 2, 2048)
            )
    return hosts, instances, guests


def write_hook(hook_dir: Path) -> None:
    hook_dir.mkdir()
    hook = hook_dir / "patch"
    hook.write_text(HOOK)
    hook.chmod(0o755)


def build(tmp: Path) -> RollWorld:
    hosts, instances, guests = cloud()
    driver = SimDriver(
        hosts,
        instances,
        clock=time.monotonic,
        link=Link(LINK_BYTES_PER_S),
        time_scale=0.01,
        aggregates={"rack1": ["h1", "h2", "h3", "h4"], "empty": []},
    )
    agents = SimAgents(driver, guests, LINK_BYTES_PER_S, host_memory_bytes=16 * GIB)
    hook_dir = tmp / "hooks"
    write_hook(hook_dir)
    return RollWorld(tmp, driver, agents, hook_dir, f"sqlite:///{tmp / 'journal.db'}")


def planned_moves(plan: cpb.RollPlan) -> Counter[str]:
    return Counter(m.vm_uuid for w in plan.waves for h in w.hosts for m in h.moves)


def planned_targets(plan: cpb.RollPlan) -> list[tuple[str, str, str]]:
    """(VM, source, target) of every planned move, wave by wave."""
    return [
        (m.vm_uuid, m.source_host, m.target_host)
        for w in plan.waves
        for h in w.hosts
        for m in h.moves
    ]
