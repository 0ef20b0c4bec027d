"""The plan as a simulator strategy: dispatch and the escalation ladder, simulated (pure).

``PlanStrategy`` starts VMs as the executor's dispatch would and steers each running
migration with the executor's ladder; the planner simulates its candidate plans
with it, and the benchmark runs the chosen plan against the true VMs with it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from hostmaint.coordinator import escalation
from hostmaint.coordinator.convergence import Migration, run_alone
from hostmaint.coordinator.dispatch import Slot, ready_to_start
from hostmaint.coordinator.model import (
    FULLY_CAPABLE,
    MIB,
    HostCapabilities,
    ModelParams,
    Outcome,
    Phase,
    Prediction,
    Settings,
    VmSpec,
)
from hostmaint.coordinator.simulator import Job

# A migration holding the link for its switch-over caps the others to this (libvirt's
# smallest cap: 1 MiB/s), for the time its rounds after the first pass take alone on the
# link, and a poll; within these bounds (longer bursts stall the others more than the
# post-copies they save are worth on the benchmark's hosts).
HELD_BACK_BYTES_PER_S = float(MIB)
BURST_POLL_S = 1.0
MIN_BURST_S, MAX_BURST_S = 1.0, 3.0


def need_bandwidth(vm: VmSpec, settings: Settings, full_bw: float, params: ModelParams) -> float:
    """Smallest bandwidth (to 2 %) at which the VM converges with these settings."""
    if settings.postcopy_after_first_round:
        return 0.0
    pre = Settings(settings.downtime_limit_ms, auto_converge=settings.auto_converge)
    lo, hi = 0.0, full_bw
    if run_alone(vm, full_bw * 0.02, pre, params).outcome is Outcome.COMPLETED:
        return full_bw * 0.02
    for _ in range(8):
        mid = (lo + hi) / 2
        if run_alone(vm, mid, pre, params).outcome is Outcome.COMPLETED:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class PlanItem:
    vm: VmSpec
    target: str | None
    prediction: Prediction
    settings: Settings
    need: float
    holds_link: bool = False
    # the VM the plan's simulation runs when it is not ``vm``: a writer planned at its
    # rate floor is simulated at its assumed rate, so the plan counts the ladder's cost
    simulated: VmSpec | None = None


class PlanStrategy:
    """Start VMs in order (backfilling) while slots, per-target slots and bandwidth allow,
    and steer each running migration with the executor's escalation ladder
    (``escalation.next_step`` over ``escalation.limits_for``, at the drain's ``pacing``),
    fed every ``pacing.poll_interval_s`` with what the agent would report: elapsed time,
    QEMU's round, the bytes left in it, the bandwidth it got, its limit. A migration whose
    limit the ladder raised holds the link, as in the executor; one in a burst caps its
    pre-copying neighbours until it releases the link or leaves pre-copy. The ladder
    takes no step the ``source`` host cannot."""

    def __init__(
        self,
        name: str,
        items: Sequence[PlanItem],
        max_parallel: int,
        per_target: int,
        total_bw: float,
        cap_ms: dict[str, float],
        params: ModelParams,
        allow_postcopy: bool,
        cpu_bound: Collection[str],
        *,
        source: HostCapabilities = FULLY_CAPABLE,
        pacing: escalation.Pacing = escalation.DEFAULT_PACING,
    ) -> None:
        self.name = name
        self.queue = list(items)
        self.max_parallel = max_parallel
        self.per_target = per_target
        self.total_bw = total_bw
        self.poll_s = pacing.poll_interval_s
        self.by_uuid = {i.vm.uuid: i for i in items}
        self.queued = {i.vm.uuid: self._slot(i) for i in items}  # as dispatch sees them queued
        self.limits = {
            i.vm.uuid: escalation.limits_for(
                predicted_total_s=i.prediction.total_s,
                operator_cap_ms=cap_ms[i.vm.uuid],
                link_bytes_per_s=total_bw,
                settings=i.settings,
                allow_postcopy=allow_postcopy,
                cpu_bound=i.vm.uuid in cpu_bound,
                source=source,
                pacing=pacing,
                params=params,
            )
            for i in items
        }
        # per running VM (by uuid: an id() is reused once freed)
        self.history: dict[str, list[escalation.Observation]] = {}
        self.done: dict[str, escalation.Escalation] = {}
        self.polled: dict[str, tuple[float, float]] = {}  # last poll: time, bytes sent
        self.raised: set[str] = set()  # VMs whose limit the ladder raised: they hold the link
        self.sharing = 1  # migrations running at the last dispatch
        self.live: dict[str, Migration] = {}  # the running migrations, at the last dispatch
        self.holder: str | None = None  # the VM holding the link for its switch-over
        self.held: list[Migration] = []  # the migrations it holds back

    def remaining(self) -> int:
        return len(self.queue)

    def next_jobs(self, now_s: float, running: Sequence[Migration]) -> list[Job]:
        """The executor's dispatch rule (``dispatch.ready_to_start``) over the plan's order."""
        self.sharing = max(1, len(running))
        self.live = {m.vm.uuid: m for m in running}
        if self.holder is not None:
            holder = self.live.get(self.holder)
            if holder is None or holder.phase not in (Phase.PRECOPY, Phase.SWITCHOVER):
                self._release()  # switched over (or ended): the others get the link back
            else:
                return []  # nothing starts while a migration holds the link
        if not self.queue or len(running) >= self.max_parallel:
            return []  # what ready_to_start would answer, without building the slots
        busy = [
            self._slot(self.by_uuid[m.vm.uuid], m.in_precopy, m.vm.uuid in self.raised)
            for m in running
        ]
        chosen = ready_to_start(
            [self.queued[i.vm.uuid] for i in self.queue],
            busy,
            max_parallel=self.max_parallel,
            max_parallel_per_target=self.per_target,
            link_bytes_per_s=self.total_bw,
        )
        starting = {c.vm_uuid for c in chosen}
        jobs = [
            Job(i.simulated or i.vm, i.settings, i.target)
            for i in self.queue
            if i.vm.uuid in starting
        ]
        self.queue = [i for i in self.queue if i.vm.uuid not in starting]
        return jobs

    @staticmethod
    def _slot(item: PlanItem, in_precopy: bool = True, raised: bool = False) -> Slot:
        return Slot(item.vm.uuid, item.target, item.need, in_precopy, raised or item.holds_link)

    def next_control_s(self, mig: Migration) -> float:
        if not mig.in_precopy:
            return math.inf
        last_s, _ = self.polled.get(mig.vm.uuid, (mig.start_s, 0.0))
        return last_s + self.poll_s

    def control(self, mig: Migration, now_s: float) -> None:
        """One progress sample, and the ladder's step if it calls for one."""
        uuid = mig.vm.uuid
        last_s, last_bytes = self.polled.get(uuid, (mig.start_s, 0.0))
        self.polled[uuid] = (now_s, mig.bytes_sent)
        history = self.history.setdefault(uuid, [])
        held_back = self.holder is not None and self.holder != uuid
        history.append(
            escalation.Observation(
                elapsed_s=now_s - mig.start_s,
                iteration=mig.rounds,
                remaining_bytes=int(mig.remaining),
                bandwidth_bytes_per_s=(mig.bytes_sent - last_bytes) / max(now_s - last_s, 1e-9),
                max_downtime_ms=int(mig.downtime_limit_ms),
                postcopy=mig.postcopy,
                first_pass_done=mig.rounds >= 2,
                fair_share_bytes_per_s=self.total_bw / self.sharing,
                held_back=held_back,
                processed_bytes=int(mig.bytes_sent),
            )
        )
        done = self.done.get(uuid, escalation.Escalation())
        decision = escalation.next_step(history, self.limits[uuid], done)
        action = decision.action
        ok = True
        if action is escalation.Action.RAISE_DOWNTIME:
            mig.set_downtime_limit(decision.value)
            self.raised.add(uuid)
        elif action is escalation.Action.THROTTLE_VCPUS:
            mig.throttle_vcpus(decision.value)
        elif action is escalation.Action.HOLD_LINK:
            self.holder = uuid
            # QEMU's cap binds pre-copy only (post-copy has its own)
            self.held = [m for u, m in self.live.items() if u != uuid and m.in_precopy]
            for m in self.held:
                m.bandwidth_cap = HELD_BACK_BYTES_PER_S
            mig.set_downtime_limit(decision.value)
        elif action is escalation.Action.RELEASE_LINK:
            mig.set_downtime_limit(decision.value)  # before the others send again
            self._release()
        elif action is escalation.Action.POSTCOPY:
            ok = mig.start_postcopy()
        elif action is escalation.Action.ABORT:
            mig.abort()
        self.done[uuid] = escalation.applied(done, decision, now_s - mig.start_s, ok)

    def _release(self) -> None:
        for m in self.held:
            m.bandwidth_cap = m.settings.max_bandwidth_bytes_per_s
        self.holder, self.held = None, []
