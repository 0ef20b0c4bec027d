"""One host's drain predicted, for the roll planner (pure: no I/O, no clock).

Public API
----------
``planned(link, policy, params=DEFAULT_PARAMS) -> DrainPredictor``
    what a drain of the host does: the drain planner's plan (``planner.plan_drain``, each
    VM pinned to the target the roll gave it: only that target accepts it), its
    predicted makespan, and the bytes the plan's simulation sends
    (``simulator.simulate`` of ``planner.plan_strategy``). VMs the planner cannot move
    (blocked, or converging with nothing the policy allows) count for nothing. A second
    or so per host of 30 VMs.
``queued(link, policy, params=DEFAULT_PARAMS) -> DrainPredictor``
    quicker, for clouds of hundreds of hosts: each VM with the cheapest tuning that
    converges at its share of the link (``convergence.predict_at`` at the link over the
    policy's ``max_parallel_per_source``, or alone on the link where no tuning converges
    at the share), started largest first, up to ``max_parallel_per_source`` at once and
    ``max_parallel_per_target`` per target, simulated (``simulator.simulate``). A VM that
    converges with no tuning the policy allows is left out; one still running after the
    model's horizon is aborted. Predictions alone are cached per VM and share, so a VM
    moved twice is predicted once.
Both use the model's physics as they are; the roll never models a migration itself.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from hostmaint.coordinator.convergence import Migration, predict_at
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    DrainPolicy,
    Link,
    ModelParams,
    Settings,
    TargetHost,
    Tuning,
    VmSpec,
    effective_bandwidth,
)
from hostmaint.coordinator.planner import plan_drain, plan_strategy
from hostmaint.coordinator.rolltypes import DrainEstimate, DrainPredictor
from hostmaint.coordinator.simulator import Job, simulate

_UNLIMITED = 1 << 62


def planned(
    link: Link, policy: DrainPolicy, params: ModelParams = DEFAULT_PARAMS
) -> DrainPredictor:
    def predict(host: str, moves: Sequence[tuple[VmSpec, str]]) -> DrainEstimate:
        vms = [vm for vm, _ in moves]
        to: dict[str, set[str]] = {}
        for vm, target in moves:
            to.setdefault(target, set()).add(vm.uuid)
        targets = [
            TargetHost(t, _UNLIMITED, _UNLIMITED, cpu_compatible=frozenset(uuids))
            for t, uuids in sorted(to.items())
        ]
        plan = plan_drain(vms, targets, link, policy, params)
        moving = {m.vm_uuid for m in plan.migrations}
        run = [v for v in vms if v.uuid in moving]
        res = simulate(run, plan_strategy(plan, run, link, policy, params), link, params, 0, policy)
        return DrainEstimate(plan.predicted_makespan_s, res.link_bytes)

    return predict


class _Queue:
    """Start jobs in order while the source and the target have a free slot; abort a
    migration still in pre-copy at the model's horizon."""

    name = "queued"

    def __init__(
        self, jobs: Sequence[Job], max_parallel: int, per_target: int, horizon_s: float
    ) -> None:
        self.queue = list(jobs)
        self.max_parallel = max(1, max_parallel)
        self.per_target = max(1, per_target)
        self.horizon_s = horizon_s
        self.target_of = {j.vm.uuid: j.target for j in jobs}

    def remaining(self) -> int:
        return len(self.queue)

    def next_jobs(self, now_s: float, running: Sequence[Migration]) -> list[Job]:
        busy = Counter(self.target_of[m.vm.uuid] for m in running)
        slots = self.max_parallel - len(running)
        jobs: list[Job] = []
        for job in self.queue:
            if len(jobs) >= slots:
                break
            if busy[job.target] < self.per_target:
                busy[job.target] += 1
                jobs.append(job)
        started = {id(j) for j in jobs}
        self.queue = [j for j in self.queue if id(j) not in started]
        return jobs

    def next_control_s(self, mig: Migration) -> float:
        return mig.start_s + self.horizon_s if mig.in_precopy else math.inf

    def control(self, mig: Migration, now_s: float) -> None:
        mig.abort()


def queued(link: Link, policy: DrainPolicy, params: ModelParams = DEFAULT_PARAMS) -> DrainPredictor:
    full_bw = effective_bandwidth(link, params)
    link_bw = link.bandwidth_bytes_per_s * params.link_efficiency
    cache: dict[tuple[VmSpec, float], Settings | None] = {}

    def settings(vm: VmSpec, share_bw: float) -> Settings | None:
        key = (vm, share_bw)
        if key not in cache:
            pred = predict_at(vm, share_bw, policy, params)
            if pred.tuning is Tuning.CANNOT_CONVERGE and share_bw < full_bw:
                pred = predict_at(vm, full_bw, policy, params)
            cache[key] = None if pred.tuning is Tuning.CANNOT_CONVERGE else pred.settings
        return cache[key]

    def predict(host: str, moves: Sequence[tuple[VmSpec, str]]) -> DrainEstimate:
        k = max(1, min(policy.max_parallel_per_source, len(moves)))
        share_bw = min(full_bw, link_bw / k)
        jobs = []
        for vm, target in sorted(moves, key=lambda m: (-m[0].memory_bytes, m[0].uuid)):
            s = settings(vm, share_bw)
            if s is not None:
                jobs.append(Job(vm, s, target))
        strategy = _Queue(jobs, k, policy.max_parallel_per_target, params.horizon_s)
        res = simulate([j.vm for j in jobs], strategy, link, params, 0, policy)
        return DrainEstimate(res.makespan_s, res.link_bytes)

    return predict
