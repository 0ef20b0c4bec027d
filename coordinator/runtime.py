"""What the parts of a running drain share: the settings, one drain's run, and the runtime.

`Runtime` holds the injected collaborators (driver, agents, journal, clock, the stop
event) and the few operations every part uses: the plan, journaled steps, events,
the cloud's record of a migration polled until it ends. `DrainRun` is one drain as
it runs: its policy, the plan it follows, its migration threads and its link.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hostmaint.coordinator import errors, escalation, resume, views
from hostmaint.coordinator.agents import AgentRegistry
from hostmaint.coordinator.dispatch import Slot
from hostmaint.coordinator.drivers.base import (
    DriverError,
    Instance,
    MigrationDriver,
    MigrationKind,
    MigrationRef,
    MigrationStatus,
    NotFound,
    Unavailable,
)
from hostmaint.coordinator.events import EventBus, Events
from hostmaint.coordinator.gather import Inputs, gather
from hostmaint.coordinator.journal import Journal, VmRow
from hostmaint.coordinator.links import LinkArbiter
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    FULLY_CAPABLE,
    DrainPolicy,
    HostCapabilities,
    Link,
    ModelParams,
)
from hostmaint.coordinator.nonlive import NonLive, non_live
from hostmaint.coordinator.pinning import pin_targets
from hostmaint.coordinator.planner import (
    MAX_BURST_S,
    DrainPlan,
    PlannedMigration,
    plan_drain,
    throttle_helps,
)
from hostmaint.coordinator.states import VmState
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb

LOG = logging.getLogger(__name__)
_WATCH_START_TIMEOUT_S = 30.0


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
    dirty_rate_max_age_s: float = 0.0
    migration_addresses: dict[str, str] | None = None
    watch_start_timeout_s: float = _WATCH_START_TIMEOUT_S
    escalation_settle_s: float = escalation.Limits.settle_s
    # a post-copy whose link broke: resumed after these waits (doubling), given up on
    # (the VM reported stranded) once paused this long
    postcopy_resume_first_s: float = 2.0
    postcopy_resume_max_s: float = 30.0
    postcopy_recovery_deadline_s: float = 900.0

    @property
    def pacing(self) -> escalation.Pacing:
        """The ladder's pace: the run's, and the plan's simulation of it."""
        return escalation.Pacing(
            stall_factor=self.stall_factor,
            stall_grace_s=self.stall_grace_s,
            settle_s=self.escalation_settle_s,
            poll_interval_s=self.poll_interval_s,
        )


class Workers:
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
class DrainRun:
    """One drain as this coordinator runs it (`Runtime.new_run` builds one)."""

    drain_id: str
    host: str
    policy: DrainPolicy
    policy_pb: cpb.DrainPolicy
    bus: EventBus[cpb.DrainEvent]
    link: LinkArbiter
    link_bytes_per_s: float = 0.0
    planned: dict[str, PlannedMigration] = field(default_factory=dict)
    thread: threading.Thread | None = None
    cpu_bound: frozenset[str] = frozenset()  # VMs the ladder may throttle (planner.throttle_helps)
    source: HostCapabilities = FULLY_CAPABLE  # what the source host can tune, as planned
    threads: Workers = field(default_factory=Workers)
    # migrations the watch saw in post-copy, whoever switched them (the ladder, Nova's
    # monitor): the guest runs on the target, they no longer need a share to converge
    in_postcopy: set[str] = field(default_factory=set)

    def remember(self, plan: DrainPlan, inputs: Inputs) -> None:
        """The plan this run follows, and what it was made from."""
        self.planned = {m.vm_uuid: m for m in plan.migrations}
        self.link_bytes_per_s = inputs.link_bandwidth_bytes_per_s
        self.cpu_bound = throttle_helps(inputs.vms, self.policy)
        self.source = inputs.source

    def vm_plan_json(self, m: PlannedMigration) -> str:
        """The VM's part of the run's plan, as the journal keeps it for a restart."""
        return resume.vm_plan_json(resume.VmPlan(m, m.vm_uuid in self.cpu_bound, self.source))

    def downtime_cap_ms(self, vm_uuid: str) -> float:
        """The operator's limit on the VM's downtime: its own, else the policy's."""
        return self.policy.downtime_cap_ms(self.policy_pb.vm_max_downtime_ms.get(vm_uuid))

    def planned_cap(self, vm_uuid: str) -> int:
        """The VM's planned bandwidth cap (0: none)."""
        planned = self.planned.get(vm_uuid)
        cap = planned.settings.max_bandwidth_bytes_per_s if planned is not None else None
        return round(cap or 0)

    def planned_limit_ms(self, vm_uuid: str) -> int:
        """The QEMU downtime limit the plan starts the VM with (0: not planned)."""
        planned = self.planned.get(vm_uuid)
        return round(planned.settings.downtime_limit_ms) if planned is not None else 0

    def limits(
        self, row: VmRow, pacing: escalation.Pacing, params: ModelParams = DEFAULT_PARAMS
    ) -> escalation.Limits:
        """The migration's ladder, built as the plan's simulation builds it."""
        planned = self.planned.get(row.vm_uuid)
        return escalation.limits_for(
            predicted_total_s=row.predicted_total_s
            or (planned.predicted_total_s if planned else 60.0),
            operator_cap_ms=self.downtime_cap_ms(row.vm_uuid),
            link_bytes_per_s=self.link_bytes_per_s * params.link_efficiency,
            settings=planned.settings if planned else None,
            allow_postcopy=self.policy.allow_postcopy,
            cpu_bound=row.vm_uuid in self.cpu_bound,
            source=self.source,
            pacing=pacing,
            params=params,
        )

    def slot(self, row: VmRow) -> Slot:
        """The VM as dispatch sees it."""
        planned = self.planned.get(row.vm_uuid)
        need = planned.need_bytes_per_s if planned is not None else 0.0
        raised = row.tuned(escalation.Action.RAISE_DOWNTIME)
        # switched to post-copy (journaled by the ladder, or seen by the watch): the guest
        # runs on the target, it no longer needs a share to converge (as the plan's
        # simulation counts it)
        postcopy = row.tuned(escalation.Action.POSTCOPY) or row.vm_uuid in self.in_postcopy
        # planned with the whole link's limit: it starts alone and runs alone
        planned_alone = planned is not None and planned.holds_link
        return Slot(
            row.vm_uuid,
            row.target_host or row.planned_target or None,
            need,
            in_precopy=not postcopy,
            holds_link=planned_alone
            or self.link.holds(row.vm_uuid)
            or (row.state == VmState.MIGRATING and raised),
        )


@contextmanager
def cloud_errors(host: str | None = None) -> Iterator[None]:
    """The driver's errors as the coordinator's: a host the cloud does not know (when
    `host` is given) is UnknownHost; anything else, CloudUnavailable."""
    try:
        yield
    except NotFound as e:
        if host is None:
            raise errors.CloudUnavailable(str(e)) from e
        raise errors.UnknownHost(host) from e
    except DriverError as e:
        raise errors.CloudUnavailable(str(e)) from e


def ref_json(ref: MigrationRef) -> str:
    return json.dumps(
        {
            "instance_uuid": ref.instance_uuid,
            "migration_id": ref.migration_id,
            "kind": str(ref.kind),
            "migration_uuid": ref.migration_uuid,
        }
    )


def ref_from_json(text: str) -> MigrationRef:
    data = json.loads(text)
    return MigrationRef(
        instance_uuid=data["instance_uuid"],
        migration_id=int(data["migration_id"]),
        kind=MigrationKind(data["kind"]),
        migration_uuid=data.get("migration_uuid"),
    )


@dataclass(frozen=True)
class Started:
    """The outcome of a journaled start: the migration, or why there is none."""

    ref: MigrationRef | None
    error: str = ""


class Runtime:
    """The collaborators of a coordinator's drains, and what every part of a drain uses."""

    def __init__(
        self,
        driver: MigrationDriver,
        registry: AgentRegistry,
        journal: Journal,
        settings: ExecutorSettings,
        *,
        clock: Callable[[], float],
        stopped: threading.Event,
        params: ModelParams = DEFAULT_PARAMS,
    ) -> None:
        self.driver = driver
        self.registry = registry
        self.journal = journal
        self.settings = settings
        self.clock = clock
        self.stopped = stopped
        self.params = params
        self.events = Events(journal, clock)
        self._wake = threading.Condition()

    # -- the dispatch loop's wake-up --------------------------------------------------

    def poke(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def nap(self) -> None:
        """Until poked, or a poll interval."""
        with self._wake:
            self._wake.wait(self.settings.poll_interval_s)

    # -- planning ---------------------------------------------------------------------

    def policy(self, policy_pb: cpb.DrainPolicy) -> DrainPolicy:
        return views.validate_policy(policy_pb, self.settings.defaults)

    def new_run(self, drain_id: str, host: str, policy_pb: cpb.DrainPolicy) -> DrainRun:
        """A drain to run: its policy checked, its link free."""
        threads = Workers()
        run = DrainRun(
            drain_id,
            host,
            self.policy(policy_pb),
            policy_pb,
            EventBus(),
            LinkArbiter(
                agent=lambda: self.registry.client(host),
                clock=self.clock,
                running=threads.alive,
                planned_cap=lambda vm: run.planned_cap(vm),
                overrun_s=MAX_BURST_S + self.settings.stall_grace_s,
            ),
            threads=threads,
        )
        return run

    def gather(self, host: str, policy_pb: cpb.DrainPolicy, measure: bool = True) -> Inputs:
        inputs = self._gather(host, policy_pb, measure)
        if not policy_pb.vm_target_hosts:
            return inputs
        # A roll's per-VM targets: only its target takes a pinned VM.
        pinned = pin_targets(inputs.targets, inputs.vms, dict(policy_pb.vm_target_hosts))
        return dataclasses.replace(inputs, targets=pinned)

    def _gather(self, host: str, policy_pb: cpb.DrainPolicy, measure: bool) -> Inputs:
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
            dirty_rate_max_age_s=self.settings.dirty_rate_max_age_s,
            clock=self.clock,
        )

    def plan(
        self, host: str, policy_pb: cpb.DrainPolicy
    ) -> tuple[cpb.DrainPlan, DrainPlan, Inputs]:
        policy = self.policy(policy_pb)
        inputs = self.gather(host, policy_pb)
        plan = self.plan_drain(inputs, policy)
        stay: list[tuple[str, str, str]] = []
        cold: list[tuple[str, str, str, str]] = []
        for i in inputs.not_live:
            fate = self.non_live(i, inputs, policy_pb)
            if fate.cold:
                cold.append((i.uuid, i.name, fate.target or "", fate.reason))
            else:
                stay.append((i.uuid, i.name, fate.reason))
        plan_pb = views.plan_to_pb(
            host, plan, inputs.link_bandwidth_bytes_per_s, inputs.vms, stay, cold
        )
        plan_pb.notes.extend(inputs.rate_notes)
        rates = inputs.rate_source
        plan_pb.dirty_rates.CopyFrom(
            cpb.DirtyRateSource(
                background_vms=rates.background_vms,
                oldest_background_age_s=rates.oldest_background_age_s,
                measured_vms=rates.measured_vms,
                measuring_s=rates.measuring_s,
            )
        )
        return plan_pb, plan, inputs

    def plan_drain(self, inputs: Inputs, policy: DrainPolicy) -> DrainPlan:
        """The planner over what was gathered, at the configured pace."""
        return plan_drain(
            inputs.vms,
            inputs.targets,
            Link(inputs.link_bandwidth_bytes_per_s),
            policy,
            self.params,
            source=inputs.source,
            pacing=self.settings.pacing,
        )

    def cold_migration_supported(self) -> bool:
        """Whether the driver can cold-migrate (the libvirt driver cannot: no image service)."""
        return self.driver.can_cold_migrate

    def non_live(self, inst: Instance, inputs: Inputs, policy_pb: cpb.DrainPolicy) -> NonLive:
        return non_live(
            inst.state,
            policy_pb,
            inputs.targets,
            can_cold_migrate=self.cold_migration_supported(),
        )

    # -- journal and events -----------------------------------------------------------

    def publish(self, run: DrainRun, kind: cpb.DrainEventKind.ValueType, **kw: Any) -> None:
        """An event of the drain (`Events.event`'s keywords), logged and published."""
        self.events.publish(run.bus, self.events.event(run.drain_id, run.host, kind, **kw))

    def step(
        self,
        run: DrainRun,
        action: str,
        vm_uuid: str,
        detail: dict[str, object],
        fn: Callable[[], str],
    ) -> str:
        """`fn` as a journaled step: its intent first, then its outcome."""
        step = self.journal.begin_step(run.drain_id, action, vm_uuid, detail)
        try:
            result = fn()
        except Exception as e:
            self.journal.end_step(step, False, str(e))
            raise
        self.journal.end_step(step, True, result)
        return result

    def start_step(
        self,
        run: DrainRun,
        action: str,
        row: VmRow,
        detail: dict[str, object],
        start: Callable[[], MigrationRef],
    ) -> Started:
        """Starts a migration as a journaled step. An answer lost on the way (the cloud
        may have acted) is settled by the cloud's record: a migration of the VM that
        runs is this one."""
        step = self.journal.begin_step(run.drain_id, action, row.vm_uuid, detail)
        try:
            ref = start()
        except Unavailable as e:
            if e.may_have_acted:
                found = self.started_anyway(row.vm_uuid)
                if found is not None:
                    self.journal.end_step(step, True, "started (answer lost)")
                    return Started(found)
            self.journal.end_step(step, False, str(e))
            return Started(None, str(e))
        except DriverError as e:
            self.journal.end_step(step, False, str(e))
            return Started(None, str(e))
        self.journal.end_step(step, True, ref_json(ref))
        return Started(ref)

    # -- the cloud's view -------------------------------------------------------------

    def host_of(self, vm_uuid: str) -> str | None:
        try:
            return self.driver.get_instance(vm_uuid).host
        except DriverError:
            return None

    def runs_on(self, host: str, vm_uuid: str) -> bool | None:
        """Whether the VM's domain runs on `host`, as its agent says (None: it did not say)."""
        try:
            domains = self.registry.client(host).list_domains([vm_uuid])
        except errors.AgentRefused as e:
            return False if e.code == "NOT_FOUND" else None
        except errors.CoordinatorError:
            return None
        return any(d.uuid == vm_uuid and d.state == apb.DOMAIN_STATE_RUNNING for d in domains)

    def started_anyway(self, vm_uuid: str) -> MigrationRef | None:
        """The VM's migration the cloud runs, if any."""
        try:
            ref = self.driver.latest_migration(vm_uuid)
            if ref is not None and not self.driver.get_migration(ref).state.finished:
                return ref
        except DriverError as e:
            LOG.warning("cannot tell whether the migration started vm=%s error=%s", vm_uuid, e)
        return None

    def statuses(
        self, ref: MigrationRef, vm_uuid: str, what: str = "migration"
    ) -> Iterator[MigrationStatus | None]:
        """The cloud's record of a migration, read every poll interval until the
        coordinator stops (None: no answer this time)."""
        while not self.stopped.is_set():
            try:
                status: MigrationStatus | None = self.driver.get_migration(ref)
            except DriverError as e:
                LOG.warning("%s status unavailable vm=%s error=%s", what, vm_uuid, e)
                status = None
            yield status
            self.stopped.wait(self.settings.poll_interval_s)
