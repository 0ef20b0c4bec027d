"""A roll of three lab hosts through the coordinator, run as its own daemon.

Three guests: two on host 0, one on host 1, host 2 empty. The hook, a script in the
coordinator's `[roll] hook_dir`, stands in for patching and rebooting: it restarts the
host's libvirtd (its guests are gone by then) and changes the hostname that libvirtd,
and so the host's agent, reports, so that the host coming back can be seen.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from hostmaint.lab import cluster
from hostmaint.lab.demo import CoordinatorProcess, coordinator_config, free_port, placement
from hostmaint.lab.guest import GuestMode, GuestSpec
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import agent_pb2_grpc, coordinator_pb2_grpc
from hostmaint.protos import coordinator_pb2 as cpb
from tests.lab.conftest import require_lab

pytestmark = pytest.mark.lab
SUBNET = "10.213.27.0/24"
PREFIX = "hm-lrl"
T = 30
ROLL_TIMEOUT_S = 600
GUESTS = [
    (GuestSpec(f"{PREFIX}-a", 128, 16, 2, GuestMode.PACED, 32), 0),
    (GuestSpec(f"{PREFIX}-b", 128, 16, 4, GuestMode.PACED, 0), 0),
    (GuestSpec(f"{PREFIX}-c", 128, 16, 2, GuestMode.PACED, 0), 1),
]
NAMES = [g.name for g, _ in GUESTS]

# Restarts the host's libvirtd, then gives its UTS namespace a new hostname.
HOOK = """#!{python}
import subprocess
import sys
from pathlib import Path

from hostmaint.lab import cluster

host = sys.argv[-1]
here = Path(__file__).resolve().parent
with (here / "ran.log").open("a") as log:
    log.write(host + "\\n")
record = cluster.Lab.load(Path({state_dir!r})).restart_libvirtd(host)
subprocess.run(
    ["nsenter", "-t", str(record.pid), "-u", "hostname", host + "-patched"], check=True
)
print(f"libvirtd of {{host}} restarted (pid {{record.pid}}), hostname {{host}}-patched")
"""


@dataclass
class Site:
    lab: cluster.Lab
    work: Path
    hooks: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_lab()
    config = cluster.LabConfig(
        prefix=PREFIX, state_dir=tmp_path_factory.mktemp("lrl"), subnet=SUBNET
    )
    plans = [cluster.GuestPlan(g, i) for g, i in GUESTS]
    lab, report = cluster.Lab.up(3, plans, config)
    print(f"\nlab: accel={report.accel} ({report.accel_reason}) phases={report.phases_s}")
    assert not report.agent_failures, report.agent_failures
    work = tmp_path_factory.mktemp("lrl-work")
    hooks = work / "hooks"
    hooks.mkdir()
    hook = hooks / "restart-libvirtd"
    hook.write_text(HOOK.format(python=sys.executable, state_dir=str(config.state_dir)))
    hook.chmod(0o755)
    try:
        yield Site(lab, work, hooks)
    finally:
        lab.down()


def _get_host(host: cluster.LabHost) -> apb.HostReport:
    with grpc.insecure_channel(host.agent_address) as channel:
        report: apb.HostReport = agent_pb2_grpc.HostAgentStub(channel).GetHost(
            apb.GetHostRequest(), timeout=T
        )
        return report


def test_a_roll_of_three_hosts_with_a_hook_that_restarts_libvirtd(site: Site) -> None:
    hosts = [h.name for h in site.lab.hosts]
    before = {h.name: _get_host(h).hostname for h in site.lab.hosts}
    assert before == {h: h for h in hosts}
    port = free_port()
    conf = site.work / "roll.conf"
    conf.write_text(
        coordinator_config(
            site.lab,
            site.work / "roll.db",
            port,
            extra={"roll": {"hook_dir": str(site.hooks), "back_timeout_s": "120"}},
        )
    )
    coordinator = CoordinatorProcess(conf, port, site.work / "roll.log")
    coordinator.start()
    try:
        with grpc.insecure_channel(coordinator.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            request = cpb.RollRequest(hosts=hosts, hook="restart-libvirtd", reason="lab")
            plan = stub.PlanRoll(request, timeout=T)
            events = list(stub.Roll(request, timeout=ROLL_TIMEOUT_S))
            drains = [
                stub.GetDrain(cpb.GetDrainRequest(drain_id=h.drain_id), timeout=T)
                for h in events[-1].status.hosts
            ]
    finally:
        coordinator.stop()
    for e in events:
        print(f"  {cpb.RollEventKind.Name(e.kind)} wave={e.wave} {e.host} {e.message}")
    assert events[-1].kind == cpb.ROLL_EVENT_KIND_FINISHED
    status = events[-1].status
    assert status.state == cpb.ROLL_STATE_COMPLETED, status
    assert [h.state for h in status.hosts] == [cpb.ROLL_HOST_STATE_DONE] * 3
    assert all(h.versions_after for h in status.hosts)
    # each hook ran once, and each host came back with what the hook changed
    ran = Counter((site.hooks / "ran.log").read_text().split())
    assert ran == Counter(hosts)
    after = {h.name: _get_host(h).hostname for h in site.lab.hosts}
    assert after == {h: f"{h}-patched" for h in hosts}
    back = [e for e in events if e.kind == cpb.ROLL_EVENT_KIND_BACK]
    finished = [e for e in events if e.kind == cpb.ROLL_EVENT_KIND_HOOK_FINISHED]
    assert [e.host for e in back] == [e.host for e in finished]
    # every guest runs once, where the plan sent it, having moved as often as planned
    where = placement(site.lab, NAMES)
    assert all(len(on) == 1 for on in where.values()), where
    moves = [m for w in status.plan.waves for h in w.hosts for m in h.moves]
    # The dry run and the roll each plan on what the hosts report then (their free
    # memory moves): both roll every host and move every VM once; host 2 starts empty,
    # it drains first, and every VM goes to a host done.
    dry_run = [m for w in plan.waves for h in w.hosts for m in h.moves]
    assert sorted(h.host for w in plan.waves for h in w.hosts) == sorted(hosts)
    assert Counter(m.vm_name for m in dry_run) == Counter(NAMES)
    assert Counter(m.vm_name for m in moves) == Counter(NAMES)
    assert status.plan.waves[0].hosts[0].host == site.lab.hosts[2].name
    assert {g: on[0] for g, on in where.items()} == {m.vm_name: m.target_host for m in moves}
    migrated = [(vm.name, vm.target_host, vm.attempts) for d in drains for vm in d.vms]
    assert sorted(migrated) == sorted((m.vm_name, m.target_host, 1) for m in moves)
    assert all(d.state == cpb.DRAIN_STATE_COMPLETED for d in drains)
    print(
        f"roll: {len(status.plan.waves)} waves, {len(moves)} moves for {len(NAMES)} VMs, "
        f"predicted {status.plan.predicted_s:.1f}s"
    )
