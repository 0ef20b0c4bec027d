"""The coordinator's Prometheus metrics, fed from its drains' event streams.

A follower thread (`metrics/drains`) looks in the journal for the drains this
coordinator runs and follows each one's events (`drainmetrics/<host>`), as a
client of `Drain` would: planning time and predicted makespan from PLANNED,
each migration's phase, progress, bandwidth, dirty rate and downtime limit
(with who set it) from PROGRESS, real downtimes from MIGRATION_COMPLETED,
outcomes and the actual makespan from FINISHED. Calls to agents that fail are
counted by the agent registry's hook.

Label sets stay bounded: `host` is a compute host, `vm_uuid` a VM migrating
now (its series go when its migration ends), everything else comes from a
fixed list. Finished drains feed counters and histograms, never a series of
their own. Needs the `metrics` extra.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from hostmaint.common import metrics
from hostmaint.coordinator.agents import AgentRegistry, Health
from hostmaint.coordinator.executor import Executor
from hostmaint.coordinator.journal import Journal
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as cpb

LOG = logging.getLogger(__name__)
PREFIX = "hostmaint"
_E = cpb.DrainEventKind
# Drains take seconds to hours; migrations seconds to tens of minutes.
DRAIN_BUCKETS_S = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))
PLANNING_BUCKETS_S = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, float("inf"))
DOWNTIME_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, float("inf"))
_VM_STATES = tuple(name.removeprefix("VM_STATE_").lower() for name in cpb.VmState.keys())
_FINISHED_STATES = ("completed", "incomplete", "cancelled", "failed")


def _phase(value: apb.MigrationPhase.ValueType) -> str:
    return apb.MigrationPhase.Name(value).removeprefix("MIGRATION_PHASE_").lower()


@dataclass
class _Migration:
    host: str
    progress: apb.MigrationProgress


@dataclass
class _Drain:
    host: str
    started_s: float
    planned_makespan_s: float | None = None


class DrainMetrics(Collector):
    """What the drains' events say: counters and histograms, and the gauges of what runs now."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self._drains: dict[str, _Drain] = {}
        self._migrations: dict[str, _Migration] = {}
        self.finished = Counter(
            f"{PREFIX}_drains_finished",
            "Drains this coordinator ran to their end, by how they ended.",
            ["state"],
            registry=registry,
        )
        self.outcomes = Counter(
            f"{PREFIX}_migrations",
            "The VMs of the finished drains, by their outcome (completed, failed, unmovable, "
            "skipped, or queued when the drain ended first).",
            ["outcome"],
            registry=registry,
        )
        self.retries = Counter(
            f"{PREFIX}_migration_retries", "Migrations retried after a failure.", registry=registry
        )
        self.makespan = Histogram(
            f"{PREFIX}_drain_makespan_seconds",
            "The makespan of each finished drain that had a plan: as planned (predicted) "
            "and as it ran (actual).",
            ["estimate"],
            buckets=DRAIN_BUCKETS_S,
            registry=registry,
        )
        self.planning = Histogram(
            f"{PREFIX}_drain_planning_seconds",
            "From a drain's start to its plan: disabling the host, measuring, planning.",
            buckets=PLANNING_BUCKETS_S,
            registry=registry,
        )
        self.downtime = Histogram(
            f"{PREFIX}_migration_downtime_seconds",
            "The real downtime of each completed live migration.",
            buckets=DOWNTIME_BUCKETS_S,
            registry=registry,
        )
        for state in _FINISHED_STATES:
            self.finished.labels(state)
        for outcome in _VM_STATES[1:]:
            self.outcomes.labels(outcome)
        registry.register(self)

    def observe(self, event: cpb.DrainEvent) -> None:
        at = event.at.ToNanoseconds() / 1e9
        with self._lock:
            if event.kind == _E.DRAIN_EVENT_KIND_STARTED:
                self._drains[event.drain_id] = _Drain(event.host, at)
            elif event.kind == _E.DRAIN_EVENT_KIND_PLANNED:
                drain = self._drains.get(event.drain_id)
                if drain is not None:
                    drain.planned_makespan_s = event.plan.predicted_makespan_s
                    self.planning.observe(max(0.0, at - drain.started_s))
            elif event.kind == _E.DRAIN_EVENT_KIND_PROGRESS and event.HasField("progress"):
                if event.progress.final:
                    self._migrations.pop(event.vm_uuid, None)
                else:
                    self._migrations[event.vm_uuid] = _Migration(event.host, event.progress)
            elif event.kind == _E.DRAIN_EVENT_KIND_MIGRATION_COMPLETED:
                self._migrations.pop(event.vm_uuid, None)
                if event.vm.actual_downtime_ms:
                    self.downtime.observe(event.vm.actual_downtime_ms / 1e3)
            elif event.kind == _E.DRAIN_EVENT_KIND_MIGRATION_FAILED:
                self._migrations.pop(event.vm_uuid, None)
            elif event.kind == _E.DRAIN_EVENT_KIND_RETRIED:
                self._migrations.pop(event.vm_uuid, None)
                self.retries.inc()
            elif event.kind == _E.DRAIN_EVENT_KIND_FINISHED:
                self._finished(event)

    def _finished(self, event: cpb.DrainEvent) -> None:
        self._drains.pop(event.drain_id, None)
        status = event.status
        for vm in status.vms:
            self._migrations.pop(vm.vm_uuid, None)
            self.outcomes.labels(cpb.VmState.Name(vm.state).removeprefix("VM_STATE_").lower()).inc()
        self.finished.labels(
            cpb.DrainState.Name(status.state).removeprefix("DRAIN_STATE_").lower()
        ).inc()
        summary = status.summary
        if status.HasField("plan") and summary.actual_makespan_s > 0:
            self.makespan.labels("predicted").observe(summary.predicted_makespan_s)
            self.makespan.labels("actual").observe(summary.actual_makespan_s)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            drains = list(self._drains.values())
            migrations = dict(self._migrations)
        running = GaugeMetricFamily(
            f"{PREFIX}_drain_started_timestamp_seconds",
            "When each host's running drain started (seconds since the epoch).",
            labels=["host"],
        )
        planned = GaugeMetricFamily(
            f"{PREFIX}_drain_planned_makespan_seconds",
            "The predicted makespan of each host's running drain.",
            labels=["host"],
        )
        for d in drains:
            running.add_metric([d.host], d.started_s)
            if d.planned_makespan_s is not None:
                planned.add_metric([d.host], d.planned_makespan_s)
        yield running
        yield planned
        yield from _migration_gauges(migrations)


def _migration_gauges(migrations: dict[str, _Migration]) -> Iterator[GaugeMetricFamily]:
    labels = ["host", "vm_uuid"]

    def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_migration_{name}", doc, labels=[*labels, *extra])

    phase = gauge("phase", "1 for the phase each running migration is in.", ("phase",))
    iteration = gauge("iteration", "Each running migration's pre-copy round.")
    progress = gauge("progress_ratio", "Each running migration's memory sent over its memory.")
    remaining = gauge("remaining_bytes", "Memory each running migration has left to send.")
    bandwidth = gauge("bandwidth_bytes_per_second", "Each running migration's bandwidth.")
    dirty = gauge("dirty_rate_bytes_per_second", "The rate each migrating VM dirties pages.")
    downtime = gauge(
        "max_downtime_seconds",
        "The downtime limit in force on each running migration, and who set it "
        "(hostmaint, or external: nova-compute's monitor or an operator).",
        ("set_by",),
    )
    phases = [p for p in apb.MigrationPhase.values() if p != apb.MIGRATION_PHASE_UNSPECIFIED]
    for uuid, m in sorted(migrations.items()):
        p, key = m.progress, [m.host, uuid]
        for value in phases:
            phase.add_metric([*key, _phase(value)], 1.0 if p.phase == value else 0.0)
        iteration.add_metric(key, float(p.iteration))
        if p.memory_total_bytes:
            progress.add_metric(key, p.memory_processed_bytes / p.memory_total_bytes)
        remaining.add_metric(key, float(p.memory_remaining_bytes))
        bandwidth.add_metric(key, p.bandwidth_bytes_per_s)
        dirty.add_metric(key, p.dirty_rate_bytes_per_s)
        if p.max_downtime_ms:
            downtime.add_metric([*key, p.max_downtime_set_by or "unknown"], p.max_downtime_ms / 1e3)
    yield from (phase, iteration, progress, remaining, bandwidth, dirty, downtime)


class AgentsCollector(Collector):
    """Each agent's health as last probed, and whether this coordinator leads."""

    def __init__(self, agents: AgentRegistry, is_leader: Callable[[], bool]) -> None:
        self._agents = agents
        self._is_leader = is_leader

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            f"{PREFIX}_agent_up",
            "1 when the host's agent served at its last probe, 0 otherwise.",
            labels=["host"],
        )
        for status in self._agents.statuses():
            up.add_metric([status.host], 1.0 if status.health == Health.SERVING else 0.0)
        yield up
        leader = GaugeMetricFamily(
            f"{PREFIX}_coordinator_leader", "1 while this coordinator leads and runs drains."
        )
        leader.add_metric([], 1.0 if self._is_leader() else 0.0)
        yield leader


class DrainFollower:
    """Follows the events of every drain this coordinator runs, into `DrainMetrics`.

    Every `interval_s` it looks in the journal for the drains running now or
    created since it started, and follows each it does not follow yet. A drain
    that another coordinator runs (this one a standby) has no events here: its
    stream is a lone FINISHED, which is not counted.
    """

    def __init__(
        self,
        executor: Executor,
        journal: Journal,
        drains: DrainMetrics,
        *,
        clock: Callable[[], float],
        stopped: threading.Event,
        interval_s: float = 1.0,
    ) -> None:
        self._executor = executor
        self._journal = journal
        self._drains = drains
        self._clock = clock
        self._stopped = stopped
        self._interval_s = interval_s
        self._since = clock()
        self._seen: set[str] = set()

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._look()
            except Exception:  # loop boundary: a journal hiccup must not end the metrics
                LOG.exception("metrics: cannot read the journal's drains")
            self._stopped.wait(self._interval_s)

    def _look(self) -> None:
        rows = self._journal.drains_since(self._since) + self._journal.active_drains()
        for drain in rows:
            if drain.id in self._seen:
                continue
            self._seen.add(drain.id)
            threading.Thread(
                target=self._follow,
                args=(drain.id,),
                name=f"drainmetrics/{drain.host}",
                daemon=True,
            ).start()

    def _follow(self, drain_id: str) -> None:
        first = True
        try:
            for event in self._executor.events(drain_id, self._stopped.is_set):
                if first and event.kind != _E.DRAIN_EVENT_KIND_STARTED:
                    return  # not a drain run here: nothing of it to count
                first = False
                self._drains.observe(event)
        except Exception:  # thread boundary
            LOG.exception("metrics: following drain=%s failed", drain_id)


class CoordinatorMetrics:
    """The coordinator's registry, its parts, and the endpoint serving them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.drains = DrainMetrics(self.registry)
        self.agent_errors = Counter(
            f"{PREFIX}_agent_call_errors",
            "Calls to agents that failed, by host, operation and status code "
            "(UNAVAILABLE and DEADLINE_EXCEEDED: the agent did not answer).",
            ["host", "operation", "code"],
            registry=self.registry,
        )
        self.rpcs = metrics.RpcCounter(metrics.rpc_counter(self.registry, f"{PREFIX}_coordinator"))
        self.endpoint: metrics.Endpoint | None = None
        self._thread: threading.Thread | None = None

    def agent_call_failed(self, host: str, operation: str, code: str) -> None:
        self.agent_errors.labels(host, operation, code).inc()

    def start(
        self,
        listen: str,
        executor: Executor,
        journal: Journal,
        agents: AgentRegistry,
        *,
        clock: Callable[[], float],
        stopped: threading.Event,
        interval_s: float,
    ) -> None:
        self.registry.register(AgentsCollector(agents, executor.coordination.is_leader))
        follower = DrainFollower(
            executor, journal, self.drains, clock=clock, stopped=stopped, interval_s=interval_s
        )
        self._thread = threading.Thread(target=follower.run, name="metrics/drains", daemon=True)
        self._thread.start()
        self.endpoint = metrics.serve(listen, self.registry)

    def stop(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()
