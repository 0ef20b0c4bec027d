"""The agent's Prometheus metrics, read from libvirt when scraped.

Every label set is bounded by what runs on this host: a domain's UUID for
the domains defined here (a domain that left is gone from the next scrape),
states, migration phases and who set the downtime limit from fixed lists,
the served RPCs' method names and status codes. Needs the `metrics` extra.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from hostmaint.agent import errors
from hostmaint.agent.service import AgentService
from hostmaint.agent.types import DomainState, MigrationPhase
from hostmaint.common import metrics

LOG = logging.getLogger(__name__)
PREFIX = "hostmaint_agent"


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels or [])


class AgentCollector(Collector):
    """What the agent's service reads from libvirt now, as gauges."""

    def __init__(self, service: AgentService) -> None:
        self._service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = _gauge("libvirt_up", "1 while the agent reaches libvirt, 0 otherwise.")
        try:
            domains = self._service.domains()
        except errors.AgentError as e:
            LOG.warning("metrics: cannot list domains error=%s", e)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up

        by_state = _gauge("domains", "Domains defined on this host, by state.", ["state"])
        counts = dict.fromkeys(DomainState, 0)
        for d in domains:
            counts[d.state] += 1
        for state, n in counts.items():
            by_state.add_metric([state.value], float(n))
        yield by_state

        memory = _gauge(
            "domain_memory_bytes", "Each domain's current memory.", ["domain_uuid", "name"]
        )
        dirty = _gauge(
            "domain_dirty_rate_bytes_per_second",
            "Each running domain's last measured dirty-page rate.",
            ["domain_uuid"],
        )
        measured = _gauge(
            "domain_dirty_rate_measured_timestamp_seconds",
            "When each domain's dirty-page rate was last measured (seconds since the epoch).",
            ["domain_uuid"],
        )
        for d in domains:
            memory.add_metric([d.uuid, d.config.name], float(d.config.memory_current_bytes))
            if d.dirty_rate is not None:
                dirty.add_metric([d.uuid], d.dirty_rate.bytes_per_s)
                measured.add_metric([d.uuid], d.dirty_rate.measured_at)
        yield memory
        yield dirty
        yield measured
        yield from self._migrations([d.uuid for d in domains if d.migrating])

    def _migrations(self, migrating: list[str]) -> Iterator[GaugeMetricFamily]:
        phase = _gauge(
            "migration_phase",
            "1 for the phase each outgoing migration of this host is in.",
            ["domain_uuid", "phase"],
        )
        iteration = _gauge(
            "migration_iteration", "Each migration's pre-copy round.", ["domain_uuid"]
        )
        progress = _gauge(
            "migration_progress_ratio",
            "Each migration's memory sent over the domain's memory (0 to 1).",
            ["domain_uuid"],
        )
        remaining = _gauge(
            "migration_remaining_bytes", "Memory each migration has left to send.", ["domain_uuid"]
        )
        bandwidth = _gauge(
            "migration_bandwidth_bytes_per_second",
            "Each migration's bandwidth as QEMU measures it.",
            ["domain_uuid"],
        )
        dirty = _gauge(
            "migration_dirty_rate_bytes_per_second",
            "The rate each migrating domain dirties pages, as QEMU measures it.",
            ["domain_uuid"],
        )
        downtime = _gauge(
            "migration_max_downtime_seconds",
            "The downtime limit in force on each migration, and who set it "
            "(hostmaint, or external: nova-compute's monitor or an operator).",
            ["domain_uuid", "set_by"],
        )
        for uuid in migrating:
            sample = self._service.tracker.current(uuid)
            if sample is None:
                continue  # the job ended between the listing and the sample
            s = sample.stats
            for p in MigrationPhase:
                phase.add_metric([uuid, p.value], 1.0 if p is s.phase else 0.0)
            iteration.add_metric([uuid], float(s.iteration))
            if s.memory_total_bytes:
                progress.add_metric([uuid], s.memory_processed_bytes / s.memory_total_bytes)
            remaining.add_metric([uuid], float(s.memory_remaining_bytes))
            bandwidth.add_metric([uuid], s.bandwidth_bytes_per_s)
            dirty.add_metric([uuid], s.dirty_rate_bytes_per_s)
            downtime.add_metric([uuid, sample.max_downtime_set_by], sample.max_downtime_ms / 1e3)
        yield from (phase, iteration, progress, remaining, bandwidth, dirty, downtime)


def registry_for(service: AgentService) -> tuple[CollectorRegistry, metrics.RpcCounter]:
    """The agent's registry, and the interceptor that counts its served calls."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(service))
    return registry, metrics.RpcCounter(metrics.rpc_counter(registry, PREFIX))
