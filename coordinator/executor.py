"""Runs drains: disable, gather, plan, then migrate in plan order, watch, escalate, retry.

One thread per drain (`drain/<host>`) dispatches; one thread per migration
(`migwatch/<uuid8>`) starts it, follows it through the source agent's
WatchMigration (or the cloud's migration record when the agent cannot watch),
escalates with the cheapest step the policy allows when it falls behind, and
records the result. A burst (the ladder's hold of the link for one migration's
switch-over) caps the drain's other migrations through the source agent and
always gives their bandwidth back: at its release, when its migration's
watcher ends, when a held-back neighbour sees it overrun, and after a restart.
Every step goes to the journal as an intent first, so a restarted coordinator
resumes each drain without starting a migration twice. It resumes the plan the
journal holds (each VM's settings): it adopts the running migrations at once,
each with its planned tuning and its ladder where it stood (`resume.py`),
measures nothing, and starts the queued VMs as planned.

VMs that cannot move live because of their state (shut off, paused,
suspended) follow the policy's `non_live_action`: REPORT leaves them in place
with the reason; COLD_MIGRATE cold-migrates them through a driver that can
(Nova; the libvirt driver cannot, and they are reported as before). Cold
migrations run one at a time once no live migration is queued or running: a
cold migration of a VM on local disks copies the disk over the same network,
which the live migrations' link plan does not account for. Each is journaled
(`cold_migrate`, then `confirm_migration`), followed on the cloud's migration
record until it awaits confirmation, confirmed, and followed to its end.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from hostmaint.coordinator import errors, escalation, resume, views
from hostmaint.coordinator.agents import AgentRegistry
from hostmaint.coordinator.dispatch import Slot, ready_to_start
from hostmaint.coordinator.drivers.base import (
    Conflict,
    DriverError,
    Instance,
    InstanceState,
    InvalidRequest,
    LiveMigrationOptions,
    MigrationDriver,
    MigrationKind,
    MigrationRef,
    MigrationState,
    MigrationStatus,
    NotFound,
    Unavailable,
)
from hostmaint.coordinator.drivers.direct import DirectDriver
from hostmaint.coordinator.gather import Inputs, gather
from hostmaint.coordinator.ha import Coordination, SingleProcess
from hostmaint.coordinator.journal import STEP_DONE, STEP_INTENT, DrainRow, Journal, StepRow, VmRow
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    FULLY_CAPABLE,
    DrainPolicy,
    HostCapabilities,
    Link,
    ModelParams,
)
from hostmaint.coordinator.planner import (
    HELD_BACK_BYTES_PER_S,
    MAX_BURST_S,
    DrainPlan,
    PlannedMigration,
    plan_drain,
    throttle_helps,
)
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb

LOG = logging.getLogger(__name__)
_FINISHED_DRAIN = ("completed", "incomplete", "cancelled", "failed")
_WATCH_START_TIMEOUT_S = 30.0
_WATCH_DEADLINE_S = 6 * 3600.0
_SETTLE_AFTER_WATCH_S = 120.0
_EVENTS_HEAD = 10
_EVENTS_KEPT = 5000
_HISTORY_KEPT = 600
# The journal row's `tuning` of a VM moved by a cold migration (not a model Tuning).
COLD = "cold"
# The states in which a VM may be cold-migrated instead of live-migrated.
_COLD_STATES = frozenset({InstanceState.SHUTOFF, InstanceState.PAUSED, InstanceState.SUSPENDED})
_CONFIRM_ATTEMPTS = 3
_INTERRUPTED = "interrupted by a coordinator restart"


@dataclass(frozen=True)
class ExecutorSettings:
    defaults: DrainPolicy
    link_bandwidth_bytes_per_s: float
    poll_interval_s: float = 1.0
    stall_factor: float = 1.5
    stall_grace_s: float = 10.0
    max_attempts: int = 2
    dirty_rate_window_s: int = 2
    dirty_rate_max_window_s: int = 8
    migration_addresses: dict[str, str] | None = None
    watch_start_timeout_s: float = _WATCH_START_TIMEOUT_S
    escalation_settle_s: float = escalation.Limits.settle_s

    @property
    def pacing(self) -> escalation.Pacing:
        """The ladder's pace: the run's, and the plan's simulation of it."""
        return escalation.Pacing(
            stall_factor=self.stall_factor,
            stall_grace_s=self.stall_grace_s,
            settle_s=self.escalation_settle_s,
            poll_interval_s=self.poll_interval_s,
        )


class EventBus:
    """A drain's events, kept so a client that re-attaches sees them from the start.

    Each event has an absolute position in the drain's stream. The first
    `_EVENTS_HEAD` (started, host disabled, planned...) are kept for good, the
    newest `_EVENTS_KEPT` in a window that slides; a follower reads by absolute
    position, so one that keeps up receives every event up to FINISHED however
    many were published, and one that re-attaches late receives the head, then
    the window.
    """

    def __init__(self, kept: int = _EVENTS_KEPT) -> None:
        self._head: list[cpb.DrainEvent] = []
        self._tail: collections.deque[cpb.DrainEvent] = collections.deque(maxlen=kept)
        self._published = 0  # events ever published: the next one's position
        self._closed = False
        self._cond = threading.Condition()

    def publish(self, event: cpb.DrainEvent) -> None:
        with self._cond:
            if self._published < _EVENTS_HEAD:
                self._head.append(event)
            else:
                self._tail.append(event)
            self._published += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _since(self, position: int) -> list[cpb.DrainEvent]:
        """The kept events from `position` on (the window's oldest if it slid past)."""
        batch = self._head[position:]
        first_in_tail = self._published - len(self._tail)
        skip = max(0, position - first_in_tail)
        batch.extend(itertools.islice(self._tail, skip, None))
        return batch

    def follow(self, stopped: Callable[[], bool]) -> Iterator[cpb.DrainEvent]:
        position = 0
        while True:
            with self._cond:
                while position >= self._published and not self._closed and not stopped():
                    self._cond.wait(0.5)
                batch = self._since(position)
                position = self._published
                closed = self._closed
            yield from batch
            if (closed and not batch) or stopped():
                return


class _Workers:
    """A drain's migration threads by VM: the dispatch thread adds, watchers read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}

    def add(self, vm_uuid: str, thread: threading.Thread) -> None:
        with self._lock:
            self._threads[vm_uuid] = thread

    def alive(self) -> set[str]:
        with self._lock:
            return {u for u, t in self._threads.items() if t.is_alive()}


@dataclass
class _Watch:
    """What the executor knows of one migration while it follows it."""

    limits: escalation.Limits
    started: float
    history: list[escalation.Observation] = field(default_factory=list)
    done: escalation.Escalation = field(default_factory=escalation.Escalation)
    downtime_ms: float = 0.0
    final_phase: int = apb.MIGRATION_PHASE_UNSPECIFIED
    error: str = ""
    finished: bool = False
    plan_applied: bool = False  # the planned QEMU downtime limit is in force on the job


@dataclass
class _Burst:
    """A migration holding the link for its switch-over, and those it holds back."""

    holder: str
    started: float
    restore_ms: int  # the holder's limit before it
    held: dict[str, int] = field(default_factory=dict)  # VM -> its cap to restore (0: none)


@dataclass
class _Run:
    drain_id: str
    host: str
    policy: DrainPolicy
    policy_pb: cpb.DrainPolicy
    bus: EventBus
    link_bytes_per_s: float = 0.0
    planned: dict[str, PlannedMigration] | None = None
    thread: threading.Thread | None = None
    cpu_bound: frozenset[str] = frozenset()  # VMs the ladder may throttle (planner.throttle_helps)
    source: HostCapabilities = FULLY_CAPABLE  # what the source host can tune, as planned
    threads: _Workers = field(default_factory=_Workers)
    burst: _Burst | None = None
    burst_lock: threading.Lock = field(default_factory=threading.Lock)


class Executor:
    def __init__(
        self,
        driver: MigrationDriver,
        registry: AgentRegistry,
        journal: Journal,
        settings: ExecutorSettings,
        *,
        clock: Callable[[], float] = time.time,
        stopped: threading.Event | None = None,
        params: ModelParams = DEFAULT_PARAMS,
        coordination: Coordination | None = None,
    ) -> None:
        self.driver = driver
        # Who leads and who holds each host's drain: one process alone by default.
        if coordination is None:
            alone = SingleProcess()
            alone.start()  # nobody else to elect: the leader from the start
            coordination = alone
        self.coordination: Coordination = coordination
        self.registry = registry
        self.journal = journal
        self.settings = settings
        self._clock = clock
        self._stopped = stopped or threading.Event()
        self._params = params
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._wake = threading.Condition()

    # -- planning -------------------------------------------------------------------

    def policy(self, policy_pb: cpb.DrainPolicy) -> DrainPolicy:
        return views.validate_policy(policy_pb, self.settings.defaults)

    def gather(self, host: str, policy_pb: cpb.DrainPolicy, measure: bool = True) -> Inputs:
        return gather(
            host,
            self.driver,
            self.registry,
            link_bandwidth_bytes_per_s=self.settings.link_bandwidth_bytes_per_s,
            dirty_rate_window_s=self.settings.dirty_rate_window_s,
            dirty_rate_max_window_s=self.settings.dirty_rate_max_window_s,
            vm_max_downtime_ms=dict(policy_pb.vm_max_downtime_ms),
            target_hosts=list(policy_pb.target_hosts),
            measure=measure,
        )

    def plan(
        self, host: str, policy_pb: cpb.DrainPolicy
    ) -> tuple[cpb.DrainPlan, DrainPlan, Inputs]:
        policy = self.policy(policy_pb)
        inputs = self.gather(host, policy_pb)
        plan = plan_drain(
            inputs.vms,
            inputs.targets,
            Link(inputs.link_bandwidth_bytes_per_s),
            policy,
            self._params,
            source=inputs.source,
            pacing=self.settings.pacing,
        )
        stay: list[tuple[str, str, str]] = []
        cold: list[tuple[str, str, str, str]] = []
        for i in inputs.not_live:
            moves, target, reason = self._non_live(i, inputs, policy_pb)
            if moves:
                cold.append((i.uuid, i.name, target or "", reason))
            else:
                stay.append((i.uuid, i.name, reason))
        plan_pb = views.plan_to_pb(
            host, plan, inputs.link_bandwidth_bytes_per_s, inputs.vms, stay, cold
        )
        return plan_pb, plan, inputs

    def cold_migration_supported(self) -> bool:
        """Whether the driver can cold-migrate: the libvirt driver cannot (no image service)."""
        return not isinstance(self.driver, DirectDriver)

    def _non_live(
        self, inst: Instance, inputs: Inputs, policy_pb: cpb.DrainPolicy
    ) -> tuple[bool, str | None, str]:
        """What becomes of a VM that cannot move live: (cold-migrate it, target, reason).

        A target only when the operator restricted the targets (the allowed
        healthy host with the most free memory); otherwise the cloud's
        scheduler chooses, checking capacity and server groups itself.
        """
        state = inst.state
        if policy_pb.non_live_action != cpb.NON_LIVE_ACTION_COLD_MIGRATE:
            return (
                False,
                None,
                f"the VM is {state}: not live-migratable; left in place (policy: report)",
            )
        if not self.cold_migration_supported():
            return (
                False,
                None,
                f"the VM is {state}: not live-migratable, and this driver cannot cold-migrate; "
                "left in place",
            )
        if state not in _COLD_STATES:
            return (
                False,
                None,
                f"the VM is {state}: it cannot be migrated in this state; left in place",
            )
        target = None
        if policy_pb.target_hosts:
            healthy = [t for t in inputs.targets if t.healthy]
            if not healthy:
                return (
                    False,
                    None,
                    f"the VM is {state}: no allowed target is available for a cold migration; "
                    "left in place",
                )
            target = max(healthy, key=lambda t: t.free_memory_bytes).name
        where = target or "a host of the scheduler's choice"
        return (
            True,
            target,
            f"the VM is {state}: to be cold-migrated to {where} once the live migrations "
            "are done (policy: cold migrate)",
        )

    # -- drains ---------------------------------------------------------------------

    def start_drain(self, host: str, policy_pb: cpb.DrainPolicy, reason: str) -> str:
        """Checks, records and starts a drain; the caller follows its events."""
        policy = self.policy(policy_pb)
        if not self.coordination.is_leader():
            raise errors.NotLeader(self.coordination.member_id)
        latest = self.journal.latest_drain(host)
        if latest is not None and latest.state in ("planning", "running", "cancelling"):
            raise errors.DrainConflict(host, latest.id)
        status = self.registry.probe(host)
        if status.health != "SERVING":
            raise errors.PreconditionFailed(
                f"drain of {host}", f"its agent is not serving ({status.health}: {status.error})"
            )
        if not self.coordination.lock_host(host):
            raise errors.DrainConflict(host, "held by another coordinator")
        try:
            drain = self.journal.create_drain(host, views.policy_to_json(policy_pb), reason)
        except BaseException:
            self.coordination.unlock_host(host)
            raise
        run = _Run(drain.id, host, policy, policy_pb, EventBus())
        self._launch(run)
        return drain.id

    def finished_drain(self, host: str) -> str | None:
        """The drain that emptied this host, while the host stays disabled."""
        latest = self.journal.latest_drain(host)
        if latest is None or latest.state != "completed":
            return None
        try:
            enabled = self.driver.host_enabled(host)
        except DriverError as e:
            raise errors.CloudUnavailable(str(e)) from e
        return None if enabled else latest.id

    def resume_all(self) -> list[str]:
        """Picks up the drains a previous coordinator left running."""
        resumed = []
        for drain in self.journal.active_drains():
            with self._lock:
                if drain.id in self._runs:
                    continue
            if not self.coordination.lock_host(drain.host):
                LOG.warning("drain left to its holder drain=%s host=%s", drain.id, drain.host)
                continue
            policy_pb = views.policy_from_json(drain.policy)
            run = _Run(drain.id, drain.host, self.policy(policy_pb), policy_pb, EventBus())
            LOG.info("resuming drain drain=%s host=%s state=%s", drain.id, drain.host, drain.state)
            self._launch(run)
            resumed.append(drain.id)
        return resumed

    def left_to_holders(self) -> list[str]:
        """The journal's active drains this coordinator does not run (resume_all left them)."""
        with self._lock:
            ours = set(self._runs)
        return [d.id for d in self.journal.active_drains() if d.id not in ours]

    def _launch(self, run: _Run) -> None:
        with self._lock:
            self._runs[run.drain_id] = run
        run.thread = threading.Thread(
            target=self._run_drain, args=(run,), name=f"drain/{run.host}", daemon=True
        )
        run.thread.start()

    def events(self, drain_id: str, stopped: Callable[[], bool]) -> Iterator[cpb.DrainEvent]:
        with self._lock:
            run = self._runs.get(drain_id)
        if run is None:
            drain = self.journal.drain(drain_id)
            yield self._event(drain.id, drain.host, cpb.DRAIN_EVENT_KIND_FINISHED, status=True)
            return
        yield from run.bus.follow(lambda: stopped() or self._stopped.is_set())

    def running(self, drain_id: str) -> bool:
        with self._lock:
            run = self._runs.get(drain_id)
        return run is not None and run.thread is not None and run.thread.is_alive()

    def wait(self, drain_id: str, timeout_s: float) -> bool:
        with self._lock:
            run = self._runs.get(drain_id)
        if run is None or run.thread is None:
            return True
        run.thread.join(timeout_s)
        return not run.thread.is_alive()

    def cancel(self, drain_id: str, abort_running: bool) -> None:
        drain = self.journal.drain(drain_id)
        if drain.state in _FINISHED_DRAIN:
            raise errors.PreconditionFailed(f"drain {drain_id}", f"it is {drain.state} already")
        self.journal.request_cancel(drain_id, abort_running)
        self._poke()

    def status(self, drain_id: str) -> cpb.DrainStatus:
        drain = self.journal.drain(drain_id)
        return views.status_to_pb(drain, self.journal.vms(drain_id))

    def undrain(self, host: str) -> None:
        latest = self.journal.latest_drain(host)
        if latest is not None and latest.state not in _FINISHED_DRAIN:
            raise errors.PreconditionFailed(
                f"undrain of {host}", f"drain {latest.id} is {latest.state}; cancel it first"
            )
        try:
            self.driver.enable_host(host)
        except NotFound as e:
            raise errors.UnknownHost(host) from e
        except DriverError as e:
            raise errors.CloudUnavailable(str(e)) from e

    def _poke(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _event(
        self,
        drain_id: str,
        host: str,
        kind: cpb.DrainEventKind.ValueType,
        *,
        vm: VmRow | None = None,
        message: str = "",
        progress: apb.MigrationProgress | None = None,
        plan: cpb.DrainPlan | None = None,
        status: bool = False,
    ) -> cpb.DrainEvent:
        event = cpb.DrainEvent(
            drain_id=drain_id,
            kind=kind,
            host=host,
            message=message,
            at=views.timestamp(self._clock()),
        )
        if vm is not None:
            event.vm_uuid = vm.vm_uuid
            event.vm.CopyFrom(views.vm_to_pb(vm))
        if progress is not None:
            event.progress.CopyFrom(progress)
        if plan is not None:
            event.plan.CopyFrom(plan)
        if status:
            event.status.CopyFrom(self.status(drain_id))
        return event

    def _publish(self, run: _Run, kind: cpb.DrainEventKind.ValueType, **kw: Any) -> None:
        event = self._event(run.drain_id, run.host, kind, **kw)
        LOG.info(
            "drain event drain=%s host=%s kind=%s vm=%s %s",
            run.drain_id[:8],
            run.host,
            cpb.DrainEventKind.Name(kind).removeprefix("DRAIN_EVENT_KIND_").lower(),
            event.vm_uuid[:8],
            event.message,
        )
        run.bus.publish(event)

    # -- the drain loop -------------------------------------------------------------

    def _run_drain(self, run: _Run) -> None:
        try:
            drain = self.journal.drain(run.drain_id)
            self._publish(run, cpb.DRAIN_EVENT_KIND_STARTED, message=drain.reason)
            if drain.state == "planning":
                # A coordinator that died while planning left at most its disable_host
                # intent open; disabling is idempotent and is carried out again below.
                self._close_interrupted(run)
                self._disable_and_plan(run, drain)
            else:
                self._restore(run, drain)
            self._dispatch_loop(run)
        except errors.CoordinatorError as e:
            LOG.warning("drain failed drain=%s host=%s error=%s", run.drain_id, run.host, e)
            self.journal.finish_drain(run.drain_id, run.host, "failed", str(e))
            self._publish(run, cpb.DRAIN_EVENT_KIND_FINISHED, message=str(e), status=True)
        except Exception as e:  # thread boundary: never leave a drain without an end
            LOG.exception("drain crashed drain=%s host=%s", run.drain_id, run.host)
            if not self._stopped.is_set():
                self.journal.finish_drain(run.drain_id, run.host, "failed", f"internal error: {e}")
                self._publish(run, cpb.DRAIN_EVENT_KIND_FINISHED, message=str(e), status=True)
        finally:
            run.bus.close()
            if not self._stopped.is_set():
                self.coordination.unlock_host(run.host)  # the drain ended here

    def _step(
        self, run: _Run, action: str, vm_uuid: str, detail: dict[str, object], fn: Callable[[], str]
    ) -> str:
        step = self.journal.begin_step(run.drain_id, action, vm_uuid, detail)
        try:
            result = fn()
        except Exception as e:
            self.journal.end_step(step, False, str(e))
            raise
        self.journal.end_step(step, True, result)
        return result

    def _disable_and_plan(self, run: _Run, drain: DrainRow) -> None:
        reason = drain.reason or f"hostmaint drain {drain.id}"

        def disable() -> str:
            try:
                self.driver.disable_host(run.host, reason)
            except NotFound as e:
                raise errors.UnknownHost(run.host) from e
            except DriverError as e:
                raise errors.CloudUnavailable(str(e)) from e
            return "disabled"

        self._step(run, "disable_host", "", {"reason": reason}, disable)
        self._publish(run, cpb.DRAIN_EVENT_KIND_HOST_DISABLED, message=reason)
        plan_pb, plan, inputs = self.plan(run.host, run.policy_pb)
        for note in inputs.notes:
            self._publish(run, cpb.DRAIN_EVENT_KIND_BLOCKED, message=note)
        self._remember(run, plan, inputs)
        rows = self._rows(run, plan, inputs)
        self.journal.save_plan(run.drain_id, views.plan_json(plan_pb), rows)
        self._publish(run, cpb.DRAIN_EVENT_KIND_PLANNED, plan=plan_pb)
        for row in self.journal.vms(run.drain_id):
            kind = (
                cpb.DRAIN_EVENT_KIND_QUEUED
                if row.state == "queued"
                else cpb.DRAIN_EVENT_KIND_BLOCKED
            )
            self._publish(run, kind, vm=row, message=row.error)

    def _remember(self, run: _Run, plan: DrainPlan, inputs: Inputs) -> None:
        run.planned = {m.vm_uuid: m for m in plan.migrations}
        run.link_bytes_per_s = inputs.link_bandwidth_bytes_per_s
        run.cpu_bound = throttle_helps(inputs.vms, run.policy)
        run.source = inputs.source

    def _rows(self, run: _Run, plan: DrainPlan, inputs: Inputs) -> list[VmRow]:
        rows = [
            VmRow(
                drain_id=run.drain_id,
                vm_uuid=m.vm_uuid,
                name=m.vm_name,
                position=m.position,
                state="queued",
                source_host=run.host,
                planned_target=m.target or "",
                tuning=str(m.tuning),
                predicted_total_s=m.predicted_total_s,
                predicted_downtime_ms=m.predicted_downtime_ms,
                planned=self._vm_plan_json(run, m),
            )
            for m in plan.migrations
        ]
        pos = len(rows)
        for u in plan.unmovable:
            rows.append(
                VmRow(
                    run.drain_id, u.vm_uuid, u.vm_name, pos, "unmovable", run.host, error=u.reason
                )
            )
            pos += 1
        for inst in inputs.not_live:
            cold, target, reason = self._non_live(inst, inputs, run.policy_pb)
            if cold:
                row = VmRow(
                    run.drain_id,
                    inst.uuid,
                    inst.name,
                    pos,
                    "queued",
                    run.host,
                    planned_target=target or "",
                    tuning=COLD,
                )
            else:
                row = VmRow(
                    run.drain_id, inst.uuid, inst.name, pos, "unmovable", run.host, error=reason
                )
            rows.append(row)
            pos += 1
        return rows

    def _restore(self, run: _Run, drain: DrainRow) -> None:
        """After a restart: the journaled plan, then each VM reconciled with the world.

        The migrations still running are adopted at once, each with its planned
        settings and its ladder where it stood; one that ended meanwhile is recorded
        as it ended, not tuned; queued VMs that left the host meanwhile are done.
        Nothing is measured. A drain journaled without each VM's settings (before
        revision 0002) is planned afresh for them, measuring as a first plan does.
        """
        steps = self.journal.steps(run.drain_id)
        if not self._recall(run, drain):
            _, plan, inputs = self.plan(run.host, run.policy_pb)
            self._remember(run, plan, inputs)
        for step in steps:
            if step.state != STEP_INTENT:
                continue
            if step.action in ("start_migration", "cold_migrate"):
                self._reconcile_start(run, step, live=step.action == "start_migration")
            elif step.action == "confirm_migration":
                self._reconcile_confirm(run, step.id, step.vm_uuid)
        self._close_interrupted(run)
        running: list[tuple[VmRow, escalation.Escalation]] = []
        ended: list[tuple[VmRow, MigrationStatus, escalation.Escalation]] = []
        burst_left = False  # a migration may hold the link: the others may be capped
        for row in self.journal.vms(run.drain_id):
            if row.state == "migrating" and not row.migration_ref:
                # Dispatched, but the coordinator died before the start was journaled.
                row = self._reconcile_unstarted(run, row)
            done = self._ladder_state(row, steps)
            burst_left = burst_left or done.holding
            if row.state != "migrating":
                continue
            if _is_cold(row):
                self._adopt(run, row, None)
                continue
            status = self._status_of(row)
            if status is not None and status.state.finished:
                ended.append((row, status, done))
            else:
                running.append((row, done))
        if burst_left:
            # the holder's limit back first, then the others' bandwidth
            running = [
                (row, self._undo_burst(run, row, done))
                for row, done in sorted(running, key=lambda r: not r[1].holding)
            ]
        for row, done in running:
            self._adopt(run, row, done)
        for row, status, done in ended:
            self._reconcile_ended(run, row, status, done)
        self._reconcile_queued(run)

    def _vm_plan_json(self, run: _Run, m: PlannedMigration) -> str:
        """The VM's part of the run's plan, as the journal keeps it for a restart."""
        return resume.vm_plan_json(resume.VmPlan(m, m.vm_uuid in run.cpu_bound, run.source))

    def _recall(self, run: _Run, drain: DrainRow) -> bool:
        """The plan the journal holds, into `run`; False when it lacks a VM's settings."""
        plans: dict[str, resume.VmPlan] = {}
        for row in self.journal.vms(run.drain_id):
            if not row.planned:
                if row.state in ("queued", "migrating") and not _is_cold(row):
                    return False
                continue
            try:
                plans[row.vm_uuid] = resume.vm_plan_from_json(row.planned)
            except ValueError as e:
                LOG.warning("journaled settings unreadable vm=%s error=%s", row.vm_uuid, e)
                return False
        if not drain.plan:
            return False
        link = views.plan_from_json(drain.plan).link_bandwidth_bytes_per_s
        run.planned = {u: p.planned for u, p in plans.items()}
        run.cpu_bound = frozenset(u for u, p in plans.items() if p.cpu_bound)
        run.source = next((p.source for p in plans.values()), run.source)
        run.link_bytes_per_s = link or self.settings.link_bandwidth_bytes_per_s
        LOG.info("resuming the journaled plan drain=%s vms=%d", run.drain_id[:8], len(plans))
        return True

    def _ladder_state(self, row: VmRow, steps: list[StepRow]) -> escalation.Escalation:
        """The ladder's state of the VM's current migration, from its journaled tuning."""
        mine = [s for s in steps if s.vm_uuid == row.vm_uuid]
        starts = [s.id for s in mine if s.action == "start_migration"]
        since = starts[-1] if starts else 0
        started = row.started_at or self._clock()
        return resume.ladder_state(
            [
                resume.TuneStep(
                    label=str(s.detail.get("action", "")),
                    at_s=s.at - started,
                    ok=None
                    if s.state == STEP_INTENT or s.result == _INTERRUPTED
                    else s.state == STEP_DONE,
                    restore_ms=int(s.detail.get("restore_ms", 0)),
                )
                for s in mine
                if s.action == "tune" and s.id > since
            ]
        )

    def _status_of(self, row: VmRow) -> MigrationStatus | None:
        """The cloud's record of the VM's migration; None when it cannot tell."""
        try:
            return self.driver.get_migration(_ref_from_json(row.migration_ref))
        except (DriverError, ValueError) as e:
            LOG.warning("cannot check the migration after a restart vm=%s error=%s", row.vm_uuid, e)
            return None

    def _close_interrupted(self, run: _Run) -> None:
        """Ends the open steps that are carried out again rather than reconciled."""
        for step in self.journal.open_steps(run.drain_id):
            self.journal.end_step(step.id, False, _INTERRUPTED)

    def _host_of(self, vm_uuid: str) -> str | None:
        try:
            return self.driver.get_instance(vm_uuid).host
        except DriverError:
            return None

    def _moved(self, run: _Run, row: VmRow) -> bool:
        host = self._host_of(row.vm_uuid)
        return host is not None and host != run.host

    def _reconcile_start(self, run: _Run, step: StepRow, live: bool = True) -> None:
        """An intent to start a migration with no outcome: find out whether it started.

        One that did started when its intent was journaled, as near as the journal
        knows: its ladder's time counts from then.
        """
        step_id, vm_uuid = step.id, step.vm_uuid
        row = self.journal.vm(run.drain_id, vm_uuid)
        ref = None
        try:
            ref = self.driver.latest_migration(vm_uuid)
        except DriverError as e:
            LOG.warning("cannot check migration after restart vm=%s error=%s", vm_uuid, e)
        if ref is not None:
            try:
                status = self.driver.get_migration(ref)
            except DriverError:
                status = None
            if status is not None and (not status.state.finished or self._moved(run, row)):
                self.journal.end_step(step_id, True, "started before the restart")
                self.journal.update_vm(
                    run.drain_id,
                    vm_uuid,
                    state="migrating",
                    migration_ref=_ref_json(ref),
                    attempts=row.attempts + 1,
                    started_at=step.at,
                    target_host=status.dest_host or row.planned_target,
                )
                return
        host = self._host_of(vm_uuid)
        if live and host is not None and host != run.host and row.state == "migrating":
            # No record of the job any more (it ended with the process that watched it), but
            # the VM runs elsewhere: this start happened, and it completed. (A cold migration
            # that moved still waits for its confirmation: not this shortcut.)
            self.journal.end_step(step_id, True, f"started before the restart; runs on {host}")
            now = self._clock()
            self.journal.update_vm(
                run.drain_id,
                vm_uuid,
                state="completed",
                attempts=row.attempts + 1,
                started_at=step.at,
                target_host=host,
                finished_at=now,
                error="",
            )
            return
        self.journal.end_step(step_id, False, "not started before the restart")

    def _reconcile_confirm(self, run: _Run, step_id: int, vm_uuid: str) -> None:
        """A confirmation with no outcome: the cloud's record says whether it arrived.

        Either way the re-attached follower re-reads the record and confirms
        only a migration still waiting for it.
        """
        row = self.journal.vm(run.drain_id, vm_uuid)
        try:
            status = self.driver.get_migration(_ref_from_json(row.migration_ref))
        except (DriverError, ValueError) as e:
            LOG.warning("cannot check the confirmation after restart vm=%s error=%s", vm_uuid, e)
            status = None
        if status is None or status.state in (
            MigrationState.AWAITING_CONFIRM,
            MigrationState.UNKNOWN,
        ):
            self.journal.end_step(step_id, False, "not confirmed before the restart")
        else:
            self.journal.end_step(
                step_id, True, f"confirmed before the restart ({status.cloud_status})"
            )

    def _reconcile_unstarted(self, run: _Run, row: VmRow) -> VmRow:
        # A cold migration moves the VM before it is confirmed: look for it first.
        found = self._started_anyway(row.vm_uuid) if _is_cold(row) else None
        if found is None:
            if self._moved(run, row):
                return self.journal.update_vm(
                    run.drain_id, row.vm_uuid, state="completed", finished_at=self._clock()
                )
            found = self._started_anyway(row.vm_uuid)
        if found is not None:
            return self.journal.update_vm(
                run.drain_id,
                row.vm_uuid,
                migration_ref=_ref_json(found),
                attempts=row.attempts + 1,
                started_at=row.started_at or self._clock(),
            )
        return self.journal.update_vm(run.drain_id, row.vm_uuid, state="queued")

    def _adopt(self, run: _Run, row: VmRow, done: escalation.Escalation | None) -> None:
        """Follows a migration started before the restart; `done`: its ladder's state."""
        LOG.info("re-attaching to migration vm=%s drain=%s", row.vm_uuid, run.drain_id[:8])
        self._spawn(run, row, adopt=True, done=done)

    def _undo_burst(
        self, run: _Run, row: VmRow, done: escalation.Escalation
    ) -> escalation.Escalation:
        """A burst the previous coordinator left: an adopted migration gets its planned
        bandwidth back, and one that held the link the limit it had before (the plan's
        where the journal does not say); its ladder then stands as after a release."""
        planned = (run.planned or {}).get(row.vm_uuid)
        request = apb.TuneMigrationRequest(
            domain_uuid=row.vm_uuid, bandwidth_bytes_per_s=self._planned_cap(run, row.vm_uuid)
        )
        restore_ms = done.restore_ms
        if not restore_ms and planned is not None:
            restore_ms = round(planned.settings.downtime_limit_ms)
        if done.holding and restore_ms:
            request.max_downtime_ms = restore_ms
            request.lower_max_downtime = True
        try:
            self.registry.client(run.host).tune(request)
        except errors.CoordinatorError as e:  # it may have ended: its watcher finds out
            LOG.warning("cannot reset the migration after a restart vm=%s error=%s", row.vm_uuid, e)
        if not done.holding:
            return done
        release = escalation.Decision(escalation.Action.RELEASE_LINK, restore_ms)
        return escalation.applied(done, release, self._clock() - (row.started_at or self._clock()))

    def _reconcile_ended(
        self, run: _Run, row: VmRow, status: MigrationStatus, done: escalation.Escalation
    ) -> None:
        """A migration that ended while no coordinator followed it: its end is recorded
        (a failed one retried as any), and nothing is tuned on a job that is gone."""
        LOG.info(
            "migration ended during the restart vm=%s drain=%s state=%s",
            row.vm_uuid,
            run.drain_id[:8],
            status.state,
        )
        if done.throttle_pct:
            self._unthrottle(run, row)
        host = self._host_of(row.vm_uuid)
        if status.state is not MigrationState.COMPLETED and (host is None or host == run.host):
            self._finish_vm(run, row, False, 0.0, f"migration {status.state} during a restart")
            return
        row = self.journal.update_vm(
            run.drain_id,
            row.vm_uuid,
            state="completed",
            target_host=status.dest_host or host or row.target_host,
            finished_at=self._clock(),
            error="",
        )
        self._publish(
            run,
            cpb.DRAIN_EVENT_KIND_MIGRATION_COMPLETED,
            vm=row,
            message="completed while no coordinator followed it",
        )

    def _reconcile_queued(self, run: _Run) -> None:
        """Queued VMs that left the host meanwhile are done (the cloud's list of the host)."""
        queued = [r for r in self.journal.vms(run.drain_id) if r.state == "queued"]
        if not queued:
            return
        try:
            here = {i.uuid for i in self.driver.list_instances(run.host)}
        except DriverError as e:
            LOG.warning("cannot list the host's VMs after a restart host=%s error=%s", run.host, e)
            return
        for row in queued:
            host = None if row.vm_uuid in here else self._host_of(row.vm_uuid)
            if host is not None and host != run.host:
                self.journal.update_vm(
                    run.drain_id, row.vm_uuid, state="completed", finished_at=self._clock()
                )

    def _dispatch_loop(self, run: _Run) -> None:
        assert run.planned is not None
        cancelled_running = False
        while not self._stopped.is_set():
            drain = self.journal.drain(run.drain_id)
            rows = self.journal.vms(run.drain_id)
            running_rows = [r for r in rows if r.state == "migrating"]
            queued = [r for r in rows if r.state == "queued"]
            if drain.cancel_requested:
                if drain.state != "cancelling":
                    self.journal.update_drain(run.drain_id, state="cancelling")
                for r in queued:
                    self.journal.update_vm(
                        run.drain_id, r.vm_uuid, state="skipped", error="drain cancelled"
                    )
                queued = []
                if drain.abort_running and not cancelled_running:
                    cancelled_running = True
                    # A cold migration cannot be aborted: it is confirmed and ends.
                    for r in running_rows:
                        if not _is_cold(r):
                            self._abort(run, r, "drain cancelled")
            alive = run.threads.alive()
            if not queued and not running_rows and not alive:
                break
            cold = [r for r in queued if _is_cold(r)]
            queued = [r for r in queued if not _is_cold(r)]
            running = [self._slot(run, r) for r in running_rows]
            queue = [self._slot(run, r) for r in queued]
            for slot in ready_to_start(
                queue,
                running,
                max_parallel=run.policy.max_parallel_per_source,
                max_parallel_per_target=run.policy.max_parallel_per_target,
                link_bytes_per_s=run.link_bytes_per_s,
            ):
                row = next(r for r in queued if r.vm_uuid == slot.vm_uuid)
                row = self.journal.update_vm(run.drain_id, row.vm_uuid, state="migrating")
                self._spawn(run, row, adopt=False)
            if cold and not queued and not running_rows and not alive:
                # One at a time, alone: its disk copy would share the live migrations' link.
                row = self.journal.update_vm(run.drain_id, cold[0].vm_uuid, state="migrating")
                self._spawn(run, row, adopt=False)
            with self._wake:
                self._wake.wait(self.settings.poll_interval_s)
        if self._stopped.is_set():
            return
        rows = self.journal.vms(run.drain_id)
        drain = self.journal.drain(run.drain_id)
        if drain.cancel_requested:
            state = "cancelled"
        elif all(r.state == "completed" for r in rows):
            state = "completed"
        else:
            state = "incomplete"
        self.journal.finish_drain(run.drain_id, run.host, state)
        self._publish(run, cpb.DRAIN_EVENT_KIND_FINISHED, message=state, status=True)

    def _slot(self, run: _Run, row: VmRow) -> Slot:
        assert run.planned is not None
        planned = run.planned.get(row.vm_uuid)
        need = planned.need_bytes_per_s if planned is not None else 0.0
        raised = any(t.startswith(escalation.Action.RAISE_DOWNTIME) for t in row.tuning_applied)
        # planned with the whole link's limit: it starts alone and runs alone
        planned_alone = planned is not None and planned.holds_link
        burst = run.burst
        bursting = burst is not None and burst.holder == row.vm_uuid
        return Slot(
            row.vm_uuid,
            row.target_host or row.planned_target or None,
            need,
            holds_link=planned_alone or bursting or (row.state == "migrating" and raised),
        )

    def _spawn(
        self, run: _Run, row: VmRow, adopt: bool, done: escalation.Escalation | None = None
    ) -> threading.Thread:
        thread = threading.Thread(
            target=self._run_vm,
            args=(run, row, adopt, done),
            name=f"migwatch/{run.drain_id[:8]}:{row.vm_uuid}",
            daemon=True,
        )
        run.threads.add(row.vm_uuid, thread)
        thread.start()
        return thread

    # -- one migration --------------------------------------------------------------

    def _run_vm(
        self, run: _Run, row: VmRow, adopt: bool, done: escalation.Escalation | None = None
    ) -> None:
        try:
            if _is_cold(row):
                self._run_cold(run, row, adopt)
                return
            ref = _ref_from_json(row.migration_ref) if adopt else self._start(run, row)
            if ref is None:
                return
            row = self.journal.vm(run.drain_id, row.vm_uuid)
            ok, downtime_ms, error = self._follow(run, row, ref, done)
            self._finish_vm(run, row, ok, downtime_ms, error)
        except Exception as e:  # thread boundary: the VM's row must not stay "migrating"
            LOG.exception("migration thread crashed vm=%s", row.vm_uuid)
            if not self._stopped.is_set() and _is_cold(row):
                self._fail_cold(run, row, f"internal error: {e}")
            elif not self._stopped.is_set():
                self._finish_vm(
                    run,
                    self.journal.vm(run.drain_id, row.vm_uuid),
                    False,
                    0,
                    f"internal error: {e}",
                )
        finally:
            self._end_burst(run, row.vm_uuid)
            self._poke()

    def _options(self, run: _Run, row: VmRow, target: str | None) -> LiveMigrationOptions:
        assert run.planned is not None
        planned = run.planned.get(row.vm_uuid)
        addresses = self.settings.migration_addresses or {}
        if planned is None:
            return LiveMigrationOptions(migration_uri=addresses.get(target or "", ""))
        s = planned.settings
        return LiveMigrationOptions(
            max_downtime_ms=round(s.downtime_limit_ms),
            auto_converge=s.auto_converge,
            allow_postcopy=s.postcopy_permitted,
            bandwidth_bytes_per_s=round(s.max_bandwidth_bytes_per_s or 0),
            migration_uri=addresses.get(target or "", ""),
        )

    def _start(self, run: _Run, row: VmRow) -> MigrationRef | None:
        target = row.target_host or row.planned_target or None
        options = self._options(run, row, target)
        detail = {
            "attempt": row.attempts + 1,
            "target": target or "",
            "options": options.describe(),
        }
        step = self.journal.begin_step(run.drain_id, "start_migration", row.vm_uuid, detail)
        try:
            ref = self.driver.start_live_migration(row.vm_uuid, target, None, options=options)
        except Unavailable as e:
            if e.may_have_acted:
                found = self._started_anyway(row.vm_uuid)
                if found is not None:
                    self.journal.end_step(step, True, "started (answer lost)")
                    return self._started(run, row, found, target)
            self.journal.end_step(step, False, str(e))
            # An attempt too: a cloud that keeps failing must not be asked forever.
            self._retry_or_fail(run, row, str(e), target, count_attempt=True)
            return None
        except (Conflict, InvalidRequest, NotFound, DriverError) as e:
            self.journal.end_step(step, False, str(e))
            self._retry_or_fail(run, row, str(e), target, count_attempt=True)
            return None
        self.journal.end_step(step, True, _ref_json(ref))
        return self._started(run, row, ref, target)

    def _started_anyway(self, vm_uuid: str) -> MigrationRef | None:
        try:
            ref = self.driver.latest_migration(vm_uuid)
            if ref is not None and not self.driver.get_migration(ref).state.finished:
                return ref
        except DriverError as e:
            LOG.warning("cannot tell whether the migration started vm=%s error=%s", vm_uuid, e)
        return None

    def _started(
        self, run: _Run, row: VmRow, ref: MigrationRef, target: str | None
    ) -> MigrationRef:
        row = self.journal.update_vm(
            run.drain_id,
            row.vm_uuid,
            state="migrating",
            migration_ref=_ref_json(ref),
            attempts=row.attempts + 1,
            started_at=self._clock(),
            target_host=target or "",
            error="",
        )
        self._publish(
            run, cpb.DRAIN_EVENT_KIND_MIGRATION_STARTED, vm=row, message=target or "(scheduler)"
        )
        return ref

    def _follow(
        self,
        run: _Run,
        row: VmRow,
        ref: MigrationRef,
        done: escalation.Escalation | None = None,
    ) -> tuple[bool, float, str]:
        """Follows the migration to its end; returns (completed, downtime ms, error).

        The source agent's WatchMigration is the close view (and drives the
        escalation, from `done` for a migration adopted after a restart); when the
        agent cannot watch (down, restarting, or a hypervisor without job
        statistics) the cloud's migration record is polled instead, and the agent
        is re-attached once it is back.
        """
        w = _Watch(self._limits(run, row), row.started_at or self._clock())
        if done is not None:
            w.done = done
        while not self._stopped.is_set():
            try:
                row = self._watch_agent(run, row, ref, w)
                break
            except errors.AgentRefused as e:
                LOG.info("agent cannot watch, following the cloud vm=%s reason=%s", row.vm_uuid, e)
                row = self._watch_cloud(run, row, ref, w, reattach=False)
                break
            except errors.AgentUnavailable as e:
                LOG.warning("agent watch lost, following the cloud vm=%s reason=%s", row.vm_uuid, e)
                row = self._watch_cloud(run, row, ref, w, reattach=True)
                if w.finished:
                    break
        self._end_burst(run, row.vm_uuid)  # before the cloud's record settles
        if self._stopped.is_set():
            return False, 0.0, "coordinator stopping"
        state = self._settle(ref)
        if w.done.throttle_pct:
            self._unthrottle(run, row)
        if state is MigrationState.COMPLETED:
            return True, w.downtime_ms, ""
        if w.final_phase == apb.MIGRATION_PHASE_COMPLETED and state is MigrationState.UNKNOWN:
            return True, w.downtime_ms, ""
        return False, w.downtime_ms, w.error or f"migration {state}"

    def _watch_agent(self, run: _Run, row: VmRow, ref: MigrationRef, w: _Watch) -> VmRow:
        agent = self.registry.client(run.host)
        for p in agent.watch(
            row.vm_uuid,
            self.settings.poll_interval_s,
            self.settings.watch_start_timeout_s,
            _WATCH_DEADLINE_S,
        ):
            if p.final:
                w.downtime_ms, w.final_phase, w.error = float(p.downtime_ms), p.phase, p.error
                w.finished = True
                return row
            if not w.plan_applied and p.memory_total_bytes:
                w.plan_applied = True
                self._apply_planned_downtime(run, row, p.max_downtime_ms)
            obs = escalation.Observation(
                elapsed_s=self._clock() - w.started,
                iteration=p.iteration,
                remaining_bytes=p.memory_remaining_bytes,
                bandwidth_bytes_per_s=p.bandwidth_bytes_per_s,
                max_downtime_ms=p.max_downtime_ms,
                postcopy=p.phase == apb.MIGRATION_PHASE_POSTCOPY,
                first_pass_done=p.iteration >= 2,
                fair_share_bytes_per_s=self._fair_share(run),
                held_back=self._held_back(run, row.vm_uuid),
            )
            row = self._observe(run, row, ref, w, obs, p)
            if self._stopped.is_set():
                return row
        w.finished = True
        return row

    def _fair_share(self, run: _Run) -> float:
        """The link over this drain's running migrations (some may still be setting up)."""
        running = len(run.threads.alive())
        return run.link_bytes_per_s * self._params.link_efficiency / max(1, running)

    def _apply_planned_downtime(self, run: _Run, row: VmRow, current_ms: int) -> None:
        """The plan's QEMU downtime limit on a job the cloud started with its own.

        The libvirt driver starts jobs with it; Nova starts them at its first
        downtime step, so the source agent raises it (and holds it against Nova's
        next steps).
        """
        assert run.planned is not None
        planned = run.planned.get(row.vm_uuid)
        want = round(planned.settings.downtime_limit_ms) if planned is not None else 0
        if want <= current_ms:
            return
        try:
            self.registry.client(run.host).tune(
                apb.TuneMigrationRequest(domain_uuid=row.vm_uuid, max_downtime_ms=want)
            )
        except errors.CoordinatorError as e:
            LOG.warning("planned downtime not applied vm=%s error=%s", row.vm_uuid, e)
            return
        LOG.info(
            "planned downtime applied vm=%s from_ms=%d to_ms=%d", row.vm_uuid, current_ms, want
        )
        self._publish(
            run, cpb.DRAIN_EVENT_KIND_TUNED, vm=row, message=f"planned max downtime {want} ms"
        )

    def _watch_cloud(
        self, run: _Run, row: VmRow, ref: MigrationRef, w: _Watch, reattach: bool
    ) -> VmRow:
        """Polls the cloud's record until the migration ends (or the agent is back)."""
        polls = 0
        while not self._stopped.is_set():
            try:
                status = self.driver.get_migration(ref)
            except DriverError as e:
                LOG.warning("migration status unavailable vm=%s error=%s", row.vm_uuid, e)
                status = None
            if status is not None and status.state.finished:
                w.finished = True
                return row
            if status is not None and status.state is MigrationState.RUNNING:
                polls += 1
                remaining = status.memory_remaining_bytes or 0
                obs = escalation.Observation(
                    elapsed_s=self._clock() - w.started,
                    iteration=polls,
                    remaining_bytes=remaining,
                    bandwidth_bytes_per_s=0.0,
                    max_downtime_ms=0,
                    held_back=self._held_back(run, row.vm_uuid),
                )
                progress = apb.MigrationProgress(
                    domain_uuid=row.vm_uuid,
                    phase=apb.MIGRATION_PHASE_PRECOPY,
                    memory_total_bytes=status.memory_total_bytes or 0,
                    memory_processed_bytes=status.memory_processed_bytes or 0,
                    memory_remaining_bytes=remaining,
                    elapsed_ms=int(obs.elapsed_s * 1000),
                )
                row = self._observe(run, row, ref, w, obs, progress)
            if reattach and polls % 5 == 4 and self.registry.client(run.host).health() == "SERVING":
                return row
            self._stopped.wait(self.settings.poll_interval_s)
        return row

    def _observe(
        self,
        run: _Run,
        row: VmRow,
        ref: MigrationRef,
        w: _Watch,
        obs: escalation.Observation,
        progress: apb.MigrationProgress,
    ) -> VmRow:
        w.history.append(obs)
        del w.history[:-_HISTORY_KEPT]
        self._publish(run, cpb.DRAIN_EVENT_KIND_PROGRESS, vm=row, progress=progress)
        decision = escalation.next_step(w.history, w.limits, w.done)
        if decision.action is not escalation.Action.NONE:
            row, w.done = self._escalate(run, row, ref, decision, w.done, obs.elapsed_s)
        return row

    def _settle(self, ref: MigrationRef) -> MigrationState:
        """The cloud's final word on the migration (it may lag the agent by a moment)."""
        deadline = self._clock() + _SETTLE_AFTER_WATCH_S
        state = MigrationState.UNKNOWN
        while not self._stopped.is_set():
            try:
                state = self.driver.get_migration(ref).state
            except DriverError as e:
                LOG.warning("migration status unavailable ref=%s error=%s", ref, e)
                state = MigrationState.UNKNOWN
            if state.finished or self._clock() > deadline:
                return state
            self._stopped.wait(self.settings.poll_interval_s)
        return state

    def _limits(self, run: _Run, row: VmRow) -> escalation.Limits:
        """The migration's ladder, built as the plan's simulation builds it."""
        assert run.planned is not None
        planned = run.planned.get(row.vm_uuid)
        cap = run.policy_pb.vm_max_downtime_ms.get(row.vm_uuid) or run.policy.max_downtime_ms
        return escalation.limits_for(
            predicted_total_s=row.predicted_total_s
            or (planned.predicted_total_s if planned else 60.0),
            operator_cap_ms=float(cap),
            link_bytes_per_s=run.link_bytes_per_s * self._params.link_efficiency,
            settings=planned.settings if planned else None,
            allow_postcopy=run.policy.allow_postcopy,
            cpu_bound=row.vm_uuid in run.cpu_bound,
            source=run.source,
            pacing=self.settings.pacing,
            params=self._params,
        )

    def _escalate(
        self,
        run: _Run,
        row: VmRow,
        ref: MigrationRef,
        decision: escalation.Decision,
        done: escalation.Escalation,
        at_s: float,
    ) -> tuple[VmRow, escalation.Escalation]:
        label = f"{decision.action}" + (f"={decision.value}" if decision.value else "")
        agent = self.registry.client(run.host)

        def act() -> str:
            if decision.action is escalation.Action.RAISE_DOWNTIME:
                agent.tune(
                    apb.TuneMigrationRequest(
                        domain_uuid=row.vm_uuid, max_downtime_ms=decision.value
                    )
                )
            elif decision.action is escalation.Action.THROTTLE_VCPUS:
                agent.tune(
                    apb.TuneMigrationRequest(
                        domain_uuid=row.vm_uuid, vcpu_throttle_pct=decision.value
                    )
                )
            elif decision.action is escalation.Action.HOLD_LINK:
                self._hold_link(run, row.vm_uuid, decision.value, decision.restore_ms)
            elif decision.action is escalation.Action.RELEASE_LINK:
                self._release_link(run, row.vm_uuid, decision.value)
            elif decision.action is escalation.Action.POSTCOPY:
                self.driver.force_complete(ref)
            elif decision.action is escalation.Action.ABORT:
                self.driver.abort(ref)
            return label

        detail: dict[str, object] = {"action": label, "reason": decision.reason}
        if decision.action is escalation.Action.HOLD_LINK:
            detail["restore_ms"] = decision.restore_ms  # a restart's release restores it
        try:
            self._step(run, "tune", row.vm_uuid, detail, act)
        except (errors.CoordinatorError, DriverError) as e:
            LOG.warning("tuning failed vm=%s action=%s error=%s", row.vm_uuid, label, e)
            self._publish(run, cpb.DRAIN_EVENT_KIND_TUNED, vm=row, message=f"{label} failed: {e}")
            return row, escalation.applied(done, decision, at_s, ok=False)
        row = self.journal.update_vm(
            run.drain_id, row.vm_uuid, tuning_applied=[*row.tuning_applied, label]
        )
        self._publish(
            run, cpb.DRAIN_EVENT_KIND_TUNED, vm=row, message=f"{label}: {decision.reason}"
        )
        return row, escalation.applied(done, decision, at_s)

    # -- a burst: one migration holds the link for its switch-over ----------------------

    def _planned_cap(self, run: _Run, vm_uuid: str) -> int:
        planned = (run.planned or {}).get(vm_uuid)
        cap = planned.settings.max_bandwidth_bytes_per_s if planned is not None else None
        return round(cap or 0)

    def _hold_link(self, run: _Run, holder: str, limit_ms: int, restore_ms: int) -> None:
        """Caps every other running migration of the drain to a trickle, then raises the
        holder's limit to the whole link's; any refusal undoes what was done (the holder's
        limit is raised only once nothing else sends). Each is given back the cap the agent
        says it replaced (one Nova or an operator set included); the plan's where the
        agent does not say."""
        with run.burst_lock:
            if run.burst is not None:
                raise errors.PreconditionFailed("hold the link", f"{run.burst.holder} holds it")
            burst = run.burst = _Burst(holder, self._clock(), restore_ms)
        others = sorted(run.threads.alive() - {holder})
        agent = self.registry.client(run.host)
        try:
            for vm in others:
                answer = agent.tune(
                    apb.TuneMigrationRequest(
                        domain_uuid=vm, bandwidth_bytes_per_s=round(HELD_BACK_BYTES_PER_S)
                    )
                )
                burst.held[vm] = (
                    answer.previous_bandwidth_bytes_per_s
                    if answer.HasField("previous_bandwidth_bytes_per_s")
                    else self._planned_cap(run, vm)
                )
            agent.tune(apb.TuneMigrationRequest(domain_uuid=holder, max_downtime_ms=limit_ms))
        except errors.CoordinatorError:
            self._end_burst(run, holder)
            raise

    def _release_link(self, run: _Run, holder: str, restore_ms: int) -> None:
        """The holder's limit back to its share's first, then the others' bandwidth."""
        try:
            self.registry.client(run.host).tune(
                apb.TuneMigrationRequest(
                    domain_uuid=holder, max_downtime_ms=restore_ms, lower_max_downtime=True
                )
            )
        finally:
            self._end_burst(run, holder)

    def _end_burst(self, run: _Run, holder: str) -> None:
        """Gives the link back to the migrations a burst of ``holder`` holds back."""
        with run.burst_lock:
            burst = run.burst
            if burst is None or burst.holder != holder:
                return
            run.burst = None
        agent = self.registry.client(run.host)
        for vm, cap in burst.held.items():
            try:
                agent.tune(apb.TuneMigrationRequest(domain_uuid=vm, bandwidth_bytes_per_s=cap))
            except errors.CoordinatorError as e:  # ended meanwhile, or the agent is away
                LOG.warning("bandwidth not restored after a burst vm=%s error=%s", vm, e)
        LOG.info("link released holder=%s held=%d", holder, len(burst.held))

    def _held_back(self, run: _Run, vm_uuid: str) -> bool:
        """Another migration holds the link; one that holds it far past any burst (its
        watcher lost) gives it back."""
        burst = run.burst
        if burst is None or burst.holder == vm_uuid:
            return False
        if self._clock() - burst.started > MAX_BURST_S + self.settings.stall_grace_s:
            LOG.warning("burst overran, releasing the link holder=%s", burst.holder)
            try:
                self._release_link(run, burst.holder, burst.restore_ms)
            except errors.CoordinatorError as e:
                LOG.warning("holder's limit not restored vm=%s error=%s", burst.holder, e)
            return False
        return True

    def _abort(self, run: _Run, row: VmRow, reason: str) -> None:
        def act() -> str:
            self.driver.abort(_ref_from_json(row.migration_ref))
            return "aborted"

        try:
            self._step(run, "abort", row.vm_uuid, {"reason": reason}, act)
        except (DriverError, ValueError) as e:
            LOG.warning("abort failed vm=%s error=%s", row.vm_uuid, e)

    def _unthrottle(self, run: _Run, row: VmRow) -> None:
        """The vCPU cap travels with the live XML: lift it wherever the VM runs now."""
        for host in (row.target_host, run.host):
            if not host:
                continue
            try:
                self.registry.client(host).tune(
                    apb.TuneMigrationRequest(domain_uuid=row.vm_uuid, vcpu_throttle_pct=0)
                )
                return
            except errors.CoordinatorError:
                continue  # not on that host
        LOG.warning("could not lift the vCPU throttle vm=%s", row.vm_uuid)

    def _finish_vm(self, run: _Run, row: VmRow, ok: bool, downtime_ms: float, error: str) -> None:
        now = self._clock()
        if ok:
            row = self.journal.update_vm(
                run.drain_id,
                row.vm_uuid,
                state="completed",
                actual_total_s=now - (row.started_at or now),
                actual_downtime_ms=downtime_ms,
                finished_at=now,
                error="",
            )
            self._publish(run, cpb.DRAIN_EVENT_KIND_MIGRATION_COMPLETED, vm=row)
            return
        if self._stopped.is_set():
            return
        drain = self.journal.drain(run.drain_id)
        if drain.cancel_requested:
            row = self.journal.update_vm(
                run.drain_id, row.vm_uuid, state="skipped", error=error, finished_at=now
            )
            self._publish(run, cpb.DRAIN_EVENT_KIND_MIGRATION_FAILED, vm=row, message=error)
            return
        self._retry_or_fail(run, row, error, row.target_host or None, count_attempt=False)

    def _retry_or_fail(
        self, run: _Run, row: VmRow, error: str, failed_target: str | None, count_attempt: bool
    ) -> None:
        row = self.journal.vm(run.drain_id, row.vm_uuid)
        inst_host = self._host_of(row.vm_uuid)
        if inst_host is not None and inst_host != run.host:
            # The attempt looked failed from here (its agent or libvirtd went away, the
            # answer was lost) but the VM runs elsewhere now: where it runs is the truth.
            LOG.warning("moved despite a failed attempt vm=%s error=%s", row.vm_uuid, error)
            now = self._clock()
            row = self.journal.update_vm(
                run.drain_id,
                row.vm_uuid,
                state="completed",
                target_host=inst_host,
                actual_total_s=now - (row.started_at or now),
                finished_at=now,
                error="",
            )
            self._publish(
                run,
                cpb.DRAIN_EVENT_KIND_MIGRATION_COMPLETED,
                vm=row,
                message=f"runs on {inst_host} (the attempt reported: {error})",
            )
            return
        attempts = row.attempts + (1 if count_attempt else 0)
        if attempts < self.settings.max_attempts:
            target = self._other_target(run, row, failed_target)
            replanned = (run.planned or {}).get(row.vm_uuid)
            row = self.journal.update_vm(
                run.drain_id,
                row.vm_uuid,
                state="queued",
                attempts=attempts,
                target_host=target or "",
                planned_target=target or "",
                error=error,
                planned=self._vm_plan_json(run, replanned) if replanned else row.planned,
            )
            self._publish(
                run,
                cpb.DRAIN_EVENT_KIND_RETRIED,
                vm=row,
                message=f"{error}; next target {target or '(scheduler)'}",
            )
            return
        row = self.journal.update_vm(
            run.drain_id,
            row.vm_uuid,
            state="failed",
            attempts=attempts,
            error=error,
            finished_at=self._clock(),
        )
        self._publish(run, cpb.DRAIN_EVENT_KIND_MIGRATION_FAILED, vm=row, message=error)

    # -- one cold migration ---------------------------------------------------------

    def _run_cold(self, run: _Run, row: VmRow, adopt: bool) -> None:
        """Starts (or re-attaches to) a cold migration, confirms it and records its end."""
        ref = _ref_from_json(row.migration_ref) if adopt else self._start_cold(run, row)
        if ref is None:
            return
        row = self.journal.vm(run.drain_id, row.vm_uuid)
        ok, dest, error = self._follow_cold(run, row, ref)
        if self._stopped.is_set():
            return
        if not ok:
            self._fail_cold(run, row, error)
            return
        if dest and dest != row.target_host:
            row = self.journal.update_vm(run.drain_id, row.vm_uuid, target_host=dest)
        # The VM did not run before and does not run after: no downtime to speak of.
        self._finish_vm(run, row, True, 0.0, "")

    def _start_cold(self, run: _Run, row: VmRow) -> MigrationRef | None:
        """Journals the intent, then asks the cloud once; a refusal fails the VM at once."""
        try:
            state = self.driver.get_instance(row.vm_uuid).state
        except DriverError as e:
            LOG.warning("cannot re-check the VM's state vm=%s error=%s", row.vm_uuid, e)
            state = None  # the cloud checks the state itself
        if state is not None and state not in _COLD_STATES:
            # Started since the plan: a cold migration would stop it.
            self._fail_cold(
                run, row, f"the VM is {state} now: not cold-migrated (that would stop it)"
            )
            return None
        target = row.target_host or row.planned_target or None
        detail = {"attempt": row.attempts + 1, "target": target or ""}
        step = self.journal.begin_step(run.drain_id, "cold_migrate", row.vm_uuid, detail)
        try:
            ref = self.driver.cold_migrate(row.vm_uuid, target)
        except Unavailable as e:
            if e.may_have_acted:
                found = self._started_anyway(row.vm_uuid)
                if found is not None:
                    self.journal.end_step(step, True, "started (answer lost)")
                    return self._started(run, row, found, target)
            self.journal.end_step(step, False, str(e))
            self._fail_cold(run, row, str(e), count_attempt=True)
            return None
        except DriverError as e:
            self.journal.end_step(step, False, str(e))
            self._fail_cold(run, row, str(e), count_attempt=True)
            return None
        self.journal.end_step(step, True, _ref_json(ref))
        return self._started(run, row, ref, target)

    def _follow_cold(self, run: _Run, row: VmRow, ref: MigrationRef) -> tuple[bool, str, str]:
        """Polls the cloud's record to its end, confirming it when it waits for that.

        Returns (completed, destination host, error). The record is re-read
        before every confirmation, so a resumed drain whose confirmation had
        reached the cloud (the record is then `confirming` or `confirmed`)
        does not confirm twice.
        """
        started = row.started_at or self._clock()
        failed_confirms = 0
        dest = ""
        while not self._stopped.is_set():
            try:
                status = self.driver.get_migration(ref)
            except DriverError as e:
                LOG.warning("cold migration status unavailable vm=%s error=%s", row.vm_uuid, e)
                status = None
            if status is not None:
                dest = status.dest_host or dest
                if status.state is MigrationState.COMPLETED:
                    return True, dest, ""
                if status.state.finished:
                    return False, dest, f"cold migration {status.state} ({status.cloud_status})"
                if status.state is MigrationState.AWAITING_CONFIRM:
                    error = self._confirm(run, row, ref)
                    if error:
                        failed_confirms += 1
                        if failed_confirms >= _CONFIRM_ATTEMPTS:
                            return False, dest, f"confirming the cold migration failed: {error}"
            if self._clock() - started > _WATCH_DEADLINE_S:
                return False, dest, f"cold migration not finished after {_WATCH_DEADLINE_S:.0f} s"
            self._stopped.wait(self.settings.poll_interval_s)
        return False, dest, "coordinator stopping"

    def _confirm(self, run: _Run, row: VmRow, ref: MigrationRef) -> str:
        """Confirms a cold migration (a journaled step); returns the error, or ""."""

        def act() -> str:
            self.driver.confirm_migration(ref)
            return "confirmed"

        detail: dict[str, object] = {"migration_id": ref.migration_id}
        try:
            self._step(run, "confirm_migration", row.vm_uuid, detail, act)
        except DriverError as e:
            LOG.warning("cold migration confirm failed vm=%s error=%s", row.vm_uuid, e)
            return str(e)
        LOG.info("cold migration confirmed vm=%s drain=%s", row.vm_uuid, run.drain_id[:8])
        return ""

    def _fail_cold(self, run: _Run, row: VmRow, error: str, count_attempt: bool = False) -> None:
        """A cold migration is tried once: the cloud refused it or it ended badly."""
        row = self.journal.vm(run.drain_id, row.vm_uuid)
        row = self.journal.update_vm(
            run.drain_id,
            row.vm_uuid,
            state="failed",
            attempts=row.attempts + (1 if count_attempt else 0),
            error=error,
            finished_at=self._clock(),
        )
        self._publish(run, cpb.DRAIN_EVENT_KIND_MIGRATION_FAILED, vm=row, message=error)

    def _other_target(self, run: _Run, row: VmRow, failed: str | None) -> str | None:
        """Another target for a retry: re-plan this VM alone, excluding the one that failed."""
        policy_pb = cpb.DrainPolicy()
        policy_pb.CopyFrom(run.policy_pb)
        try:
            inputs = self.gather(run.host, policy_pb, measure=False)
        except errors.CoordinatorError as e:
            LOG.warning("cannot re-plan a retry vm=%s error=%s", row.vm_uuid, e)
            return failed
        vms = [v for v in inputs.vms if v.uuid == row.vm_uuid]
        targets = [t for t in inputs.targets if t.name != failed] or list(inputs.targets)
        if not vms or not targets:
            return failed
        plan = plan_drain(
            vms,
            targets,
            Link(inputs.link_bandwidth_bytes_per_s),
            run.policy,
            self._params,
            source=inputs.source,
            pacing=self.settings.pacing,
        )
        if not plan.migrations:
            return failed
        assert run.planned is not None
        run.planned[row.vm_uuid] = replace(plan.migrations[0])
        return plan.migrations[0].target


def _is_cold(row: VmRow) -> bool:
    return row.tuning == COLD


def _ref_json(ref: MigrationRef) -> str:
    return json.dumps(
        {
            "instance_uuid": ref.instance_uuid,
            "migration_id": ref.migration_id,
            "kind": str(ref.kind),
            "migration_uuid": ref.migration_uuid,
        }
    )


def _ref_from_json(text: str) -> MigrationRef:
    data = json.loads(text)
    return MigrationRef(
        instance_uuid=data["instance_uuid"],
        migration_id=int(data["migration_id"]),
        kind=MigrationKind(data["kind"]),
        migration_uuid=data.get("migration_uuid"),
    )
