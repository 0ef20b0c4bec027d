"""The agent's operations, in domain terms; the gRPC servicer only translates."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace

from hostmaint.agent import errors, hoststats, inventory
from hostmaint.agent.dirtyrate import DirtyRateMeter, validate_window
from hostmaint.agent.libvirt_driver import LibvirtDriver
from hostmaint.agent.migrations import MigrationTracker, Sample
from hostmaint.agent.types import (
    CpuComparison,
    CpuDefinition,
    DirtyRate,
    DirtyRateMethod,
    Domain,
    DomainState,
    HostInfo,
    HostLoad,
    MigrationRequest,
)

LOG = logging.getLogger(__name__)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DEST_SCHEMES = ("qemu+tcp://", "qemu+tls://", "qemu+ssh://", "qemu+unix://", "qemu://")
MAX_WATCH_INTERVAL_S = 60.0
MIN_WATCH_INTERVAL_S = 0.05
MAX_START_TIMEOUT_S = 3600.0


def check_uuid(value: str, field: str = "domain_uuid") -> str:
    if not _UUID.match(value or ""):
        raise errors.InvalidArgument(field, f"{value!r} is not a UUID")
    return value.lower()


class AgentService:
    def __init__(
        self,
        driver: LibvirtDriver,
        meter: DirtyRateMeter,
        tracker: MigrationTracker,
        *,
        default_window_s: int,
        default_watch_interval_s: float,
        migration_interface: str,
        allowed_destinations: Sequence[str] = (),
    ) -> None:
        self.driver = driver
        self.meter = meter
        self.tracker = tracker
        self._default_window_s = default_window_s
        self._default_watch_interval_s = default_watch_interval_s
        self._migration_interface = migration_interface
        self._allowed_destinations = tuple(allowed_destinations)

    def host(self) -> tuple[HostInfo, HostLoad]:
        info = self.driver.host_info()
        names = [
            d.config.name for d in self.driver.list_domains() if d.state is DomainState.RUNNING
        ]
        return info, hoststats.read_host_load(names, self._migration_interface)

    def domains(self, domain_uuids: Sequence[str] = ()) -> list[Domain]:
        wanted = [check_uuid(u) for u in domain_uuids]
        raws = [self.driver.domain(u) for u in wanted] if wanted else self.driver.list_domains()
        found = []
        for raw in raws:
            uuid = raw.config.uuid
            found.append(
                Domain(
                    config=raw.config,
                    state=raw.state,
                    persistent=raw.persistent,
                    rss_bytes=raw.rss_bytes,
                    unused_bytes=raw.unused_bytes,
                    migrating=raw.migrating,
                    blockers=inventory.migration_blockers(raw.config, raw.state, raw.migrating),
                    dirty_rate=self.meter.last(uuid),
                    vcpu_throttle_pct=self.tracker.vcpu_throttle_pct(uuid),
                )
            )
        return found

    def measure_dirty_rate(
        self, domain_uuids: Sequence[str], window_s: float, method: DirtyRateMethod | None
    ) -> dict[str, DirtyRate]:
        window = validate_window(window_s) if window_s else self._default_window_s
        wanted = [check_uuid(u) for u in domain_uuids]
        if not wanted:
            wanted = [
                d.config.uuid for d in self.driver.list_domains() if d.state is DomainState.RUNNING
            ]
        for uuid in wanted:
            raw = self.driver.domain(uuid)
            if raw.state is not DomainState.RUNNING:
                raise errors.OperationRefused(uuid, "measure dirty rate", f"domain is {raw.state}")
        return self.meter.measure(wanted, window, method)

    def check_cpu(self, cpu: CpuDefinition) -> CpuComparison:
        if not cpu.xml and not cpu.model and not cpu.features:
            raise errors.InvalidArgument("cpu", "needs xml, a model or features")
        if cpu.xml:
            cpu = replace(cpu, xml=cpu.xml.strip())
            if not cpu.xml.startswith("<cpu"):
                raise errors.InvalidArgument("cpu.xml", "must be a <cpu> element")
        return self.driver.compare_cpu(inventory.cpu_xml(cpu))

    def watch(
        self, domain_uuid: str, interval_s: float, start_timeout_s: float
    ) -> Iterator[Sample]:
        uuid = check_uuid(domain_uuid)
        if interval_s < 0 or start_timeout_s < 0:
            raise errors.InvalidArgument("interval_s/start_timeout_s", "must not be negative")
        if start_timeout_s > MAX_START_TIMEOUT_S:
            raise errors.InvalidArgument("start_timeout_s", f"at most {MAX_START_TIMEOUT_S} s")
        interval = interval_s or self._default_watch_interval_s
        interval = min(max(interval, MIN_WATCH_INTERVAL_S), MAX_WATCH_INTERVAL_S)
        try:
            self.driver.domain(uuid)  # NOT_FOUND before any streaming
        except errors.DomainNotFound:
            if not self.tracker.has_outcome(uuid):
                raise  # a migration that just moved it away still has its result to tell
        return self.tracker.watch(uuid, interval, start_timeout_s)

    def tune(
        self,
        domain_uuid: str,
        *,
        max_downtime_ms: int | None,
        bandwidth_bytes_per_s: int | None,
        start_postcopy: bool,
        abort: bool,
        vcpu_throttle_pct: int | None,
    ) -> tuple[list[str], int]:
        uuid = check_uuid(domain_uuid)
        if vcpu_throttle_pct is not None and not 0 <= vcpu_throttle_pct <= 99:
            raise errors.InvalidArgument("vcpu_throttle_pct", "must be between 0 and 99")
        if abort and (start_postcopy or max_downtime_ms is not None):
            raise errors.InvalidArgument("abort", "cannot be combined with other changes")
        if not any(
            (
                max_downtime_ms is not None,
                bandwidth_bytes_per_s is not None,
                start_postcopy,
                abort,
                vcpu_throttle_pct is not None,
            )
        ):
            raise errors.InvalidArgument("request", "asks for no change")
        return self.tracker.tune(
            uuid,
            max_downtime_ms=max_downtime_ms,
            bandwidth_bytes_per_s=bandwidth_bytes_per_s,
            start_postcopy=start_postcopy,
            abort=abort,
            vcpu_throttle_pct=vcpu_throttle_pct,
        )

    def migrate(self, request: MigrationRequest) -> float:
        uuid = check_uuid(request.domain_uuid)
        dest = request.destination_uri
        if not dest.startswith(_DEST_SCHEMES):
            raise errors.InvalidArgument(
                "destination_uri", "must be a qemu libvirt URI (qemu+tcp://, qemu+tls://, ...)"
            )
        if self._allowed_destinations and dest not in self._allowed_destinations:
            raise errors.InvalidArgument("destination_uri", f"{dest} is not a configured peer")
        if request.migration_uri and not request.migration_uri.startswith(("tcp://", "rdma://")):
            raise errors.InvalidArgument("migration_uri", "must be tcp://host[:port]")
        if request.parallel_connections > 255:
            raise errors.InvalidArgument("parallel_connections", "at most 255")
        for pct_field in ("auto_converge_initial_pct", "auto_converge_increment_pct"):
            if getattr(request, pct_field) > 100:
                raise errors.InvalidArgument(pct_field, "at most 100")
        return self.tracker.migrate(replace(request, domain_uuid=uuid))
