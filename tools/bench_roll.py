"""Benchmark: rolling maintenance of whole clouds, hostmaint's roll against the naive one.

    python tools/bench_roll.py [--sizes 20,100,500] [--fills 0.5,0.7,0.85]
                               [--wave-share 0.1] [--predictor queued|planned] [--seed 1]

Seeded synthetic clouds: hosts of 512 GiB and 64 CPUs at a vCPU allocation ratio of 2.5,
each filled to the row's level (times 0.75 to 1.25, at most 97 %) with VMs drawn by
``coordinator/scenarios.py`` (memory 1-64 GiB, 1-8 vCPUs, idle to hot writers), as the
agents report them; hard anti-affinity groups of three and soft ones of four on
distinct hosts, hard-affinity pairs on one host. Links of 25 Gbit/s, the scenarios'
drain policy.

For each cloud it plans hostmaint's roll (``coordinator/roll.py``; at most
``--wave-share`` of the hosts at once) and the naive roll (host after host in name
order, each VM to the least-filled host not being drained, as a scheduler picks,
ignoring future drains), each host's drain predicted by the same predictor
(``coordinator/rollpredict.py``: ``queued`` simulates each drain with the model's
cheapest converging tunings, ``planned`` runs the drain planner on every host and is
about a hundred times slower). Both rolls are then replayed wave by wave to check that no
host goes over its memory or vCPUs and no hard server-group rule breaks.

Per row: the cloud's fill and VMs, the hosts drained at once (``N``); per roll: VM moves
per VM, TiB sent (predicted, re-sent dirty pages included) and TiB copied (each moved
VM's pages once), total time in hours (hostmaint: its waves' predicted times summed;
naive: its host drains summed; no maintenance time) and the fullest any host gets
(memory); for hostmaint also the fewest moves per VM any roll makes (``bound``: the first
host drained has no done host to send its VMs to, so they move twice; the fewest are
those of the host with the fewest VMs), the VMs it parks (moving twice) and its waves;
then whether both rolls replayed within every rule, and the row's run time.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hostmaint.coordinator import rollpredict
from hostmaint.coordinator.model import (
    GIB,
    DrainPolicy,
    Link,
    ModelParams,
    ServerGroup,
    VmSpec,
    first_round_bytes,
)
from hostmaint.coordinator.roll import naive_roll, plan_roll
from hostmaint.coordinator.rollaudit import replay_roll
from hostmaint.coordinator.rolltypes import DrainPredictor, RollHost, RollPlan, RollPolicy
from hostmaint.coordinator.scenarios import make_scenario

HOST_MEMORY_BYTES = 512 * GIB
HOST_PCPUS = 64
CPU_ALLOCATION_RATIO = 2.5
LINK_GBIT = 25.0
MAX_FILL = 0.97
TIB = 1024 * GIB
PREDICTORS: dict[str, Callable[[Link, DrainPolicy, ModelParams], DrainPredictor]] = {
    "queued": rollpredict.queued,
    "planned": rollpredict.planned,
}


@dataclass(frozen=True)
class Cloud:
    hosts: tuple[RollHost, ...]
    link: Link
    policy: DrainPolicy

    @property
    def memory_fill(self) -> float:
        used = sum(v.memory_bytes for h in self.hosts for v in h.vms)
        return used / sum(h.memory_capacity_bytes for h in self.hosts)


def make_cloud(n_hosts: int, fill: float, seed: int, mix: str = "mixed") -> Cloud:
    """A seeded cloud of ``n_hosts`` hosts filled to about ``fill`` of their memory."""
    rng = random.Random(seed)
    vcpu_cap = int(HOST_PCPUS * CPU_ALLOCATION_RATIO)
    link = None
    policy = None
    hosts: list[list[VmSpec]] = []
    names = [f"cmp{i:03d}" for i in range(n_hosts)]
    for i, name in enumerate(names):
        spread = min(0.25, MAX_FILL / fill - 1.0)  # symmetric: the mean stays at the fill
        target = fill * rng.uniform(1.0 - spread, 1.0 + spread)
        sc = make_scenario(name, seed * 100_000 + i, 96, LINK_GBIT, mix)
        link, policy = sc.link, sc.policy
        mem, cpu, vms = 0, 0, []
        for vm in sc.reported:
            if mem + vm.memory_bytes > target * HOST_MEMORY_BYTES:
                continue
            if cpu + vm.vcpus > MAX_FILL * vcpu_cap:
                continue
            mem += vm.memory_bytes
            cpu += vm.vcpus
            vms.append(dataclasses.replace(vm, server_groups=()))
        hosts.append(vms)
    _add_groups(rng, hosts)
    assert link is not None and policy is not None
    return Cloud(
        tuple(
            RollHost(name, HOST_MEMORY_BYTES, HOST_PCPUS, CPU_ALLOCATION_RATIO, tuple(vms))
            for name, vms in zip(names, hosts, strict=True)
        ),
        link,
        policy,
    )


def _add_groups(rng: random.Random, hosts: list[list[VmSpec]]) -> None:
    """Hard anti-affinity groups of 3 and soft ones of 4 (members on distinct hosts), and
    hard-affinity pairs on one host; a VM in one group at most."""
    free = [list(range(len(vms))) for vms in hosts]

    def join(h: int, group: ServerGroup) -> bool:
        if not free[h]:
            return False
        j = free[h].pop(rng.randrange(len(free[h])))
        hosts[h][j] = dataclasses.replace(hosts[h][j], server_groups=(group,))
        return True

    n = len(hosts)
    for g in range(max(1, n // 4)):
        for policy, size in (("anti-affinity", 3), ("soft-anti-affinity", 4)):
            group = ServerGroup(f"{policy}-{g}", policy)
            for h in rng.sample(range(n), min(size, n)):
                join(h, group)
    for g in range(max(1, n // 10)):
        h = rng.randrange(n)
        if len(free[h]) >= 2:
            group = ServerGroup(f"affinity-{g}", "affinity")
            join(h, group)
            join(h, group)


@dataclass(frozen=True)
class Row:
    cloud: Cloud
    hosts: int
    fill: float
    vms: int
    max_hosts_per_wave: int
    # the fewest moves per VM any roll makes: the VMs of the first host drained move
    # twice (no host is done yet), and the fewest are those of the host with the fewest
    moves_bound: float
    roll: RollPlan
    naive: RollPlan
    roll_copy_bytes: float  # each page of each move once (no re-sent dirty pages)
    naive_copy_bytes: float
    violations: tuple[str, ...]
    run_s: float


def copy_bytes(cloud: Cloud, plan: RollPlan) -> float:
    vm_of = {v.uuid: v for h in cloud.hosts for v in h.vms}
    return sum(first_round_bytes(vm_of[m.vm_uuid]) for m in plan.moves)


def run_row(
    n_hosts: int,
    fill: float,
    wave_share: float = 0.1,
    predictor: str = "queued",
    seed: int = 1,
    mix: str = "mixed",
) -> Row:
    started = time.perf_counter()  # the benchmark's own run time, not the plan's
    cloud = make_cloud(n_hosts, fill, seed * 1000 + n_hosts + round(fill * 100), mix)
    predict = PREDICTORS[predictor](cloud.link, cloud.policy, ModelParams())
    n = max(1, round(wave_share * n_hosts))
    roll = plan_roll(cloud.hosts, RollPolicy(max_hosts_per_wave=n), predict)
    naive = naive_roll(cloud.hosts, predict)
    bad = replay_roll(cloud.hosts, roll, n).violations + replay_roll(cloud.hosts, naive).violations
    vms = sum(len(h.vms) for h in cloud.hosts)
    bound = 1.0 + min(len(h.vms) for h in cloud.hosts) / vms if vms else 0.0
    return Row(
        cloud=cloud,
        hosts=n_hosts,
        fill=cloud.memory_fill,
        vms=vms,
        max_hosts_per_wave=n,
        moves_bound=bound,
        roll=roll,
        naive=naive,
        roll_copy_bytes=copy_bytes(cloud, roll),
        naive_copy_bytes=copy_bytes(cloud, naive),
        violations=bad,
        run_s=time.perf_counter() - started,
    )


TITLE = f"{'':24} | {'hostmaint roll':^61} | {'naive roll':^38} |"
HEADER = (
    f"{'hosts':>5} {'fill':>5} {'VMs':>6} {'N':>3} | {'moves/VM':>8} {'bound':>6}"
    f" {'parked':>6} {'waves':>5} {'sentTiB':>7} {'copyTiB':>7} {'time_h':>6} {'peak':>5} |"
    f" {'moves/VM':>8} {'sentTiB':>7} {'copyTiB':>7} {'time_h':>6} {'peak':>5} |"
    f" {'rules':>5} {'run_s':>5}"
)


def format_row(r: Row) -> str:
    def cols(p: RollPlan, copied: float) -> str:
        return (
            f"{p.bytes_sent / TIB:7.1f} {copied / TIB:7.1f} {p.predicted_s / 3600:6.1f}"
            f" {p.memory_fill_peak:5.0%}"
        )

    return (
        f"{r.hosts:5d} {r.fill:5.0%} {r.vms:6d} {r.max_hosts_per_wave:3d} |"
        f" {r.roll.moves_per_vm:8.3f} {r.moves_bound:6.3f} {len(r.roll.parked):6d}"
        f" {len(r.roll.waves):5d} {cols(r.roll, r.roll_copy_bytes)} |"
        f" {r.naive.moves_per_vm:8.3f} {cols(r.naive, r.naive_copy_bytes)} |"
        f" {'ok' if not r.violations else 'BROKEN':>5} {r.run_s:5.1f}"
    )


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", default="20,100,500", help="hosts per cloud")
    ap.add_argument("--fills", default="0.5,0.7,0.85", help="memory fill levels")
    ap.add_argument("--wave-share", type=float, default=0.1, help="hosts drained at once")
    ap.add_argument("--predictor", choices=sorted(PREDICTORS), default="queued")
    ap.add_argument("--mix", choices=("idle", "mixed", "heavy"), default="mixed")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    began = time.perf_counter()
    out = sys.stdout
    out.write(f"{TITLE}\n{HEADER}\n")
    broken = False
    for size in (int(x) for x in _floats(args.sizes)):
        for fill in _floats(args.fills):
            row = run_row(size, fill, args.wave_share, args.predictor, args.seed, args.mix)
            out.write(format_row(row) + "\n")
            out.flush()
            for v in row.violations:
                out.write(f"    {v}\n")
            broken = broken or bool(row.violations)
    out.write(f"total run time {time.perf_counter() - began:.0f} s\n")
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
