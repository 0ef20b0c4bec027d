"""The agent's only door to libvirt.

libvirt's camelCase, its raw dicts and its error codes stay in this module:
callers get the typed values of `agent.types` and the errors of
`agent.errors`. The connection is re-opened when libvirtd restarts, and the
default event loop runs in a thread named `libvirt-events` so lifecycle and
job-completed events reach the listeners.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import libvirt

from hostmaint.agent import errors, inventory
from hostmaint.agent.types import (
    CpuComparison,
    DirtyRate,
    DirtyRateMethod,
    DomainConfig,
    DomainState,
    HostInfo,
    JobStats,
    MigrationPhase,
    MigrationRequest,
    PausedIncoming,
    SchedulerReading,
)

LOG = logging.getLogger(__name__)

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}
_DIRTY_MODES = {
    DirtyRateMethod.PAGE_SAMPLING: libvirt.VIR_DOMAIN_DIRTYRATE_MODE_PAGE_SAMPLING,
    DirtyRateMethod.DIRTY_BITMAP: libvirt.VIR_DOMAIN_DIRTYRATE_MODE_DIRTY_BITMAP,
    DirtyRateMethod.DIRTY_RING: libvirt.VIR_DOMAIN_DIRTYRATE_MODE_DIRTY_RING,
}
_JOB_FINAL = {
    libvirt.VIR_DOMAIN_JOB_COMPLETED: MigrationPhase.COMPLETED,
    libvirt.VIR_DOMAIN_JOB_FAILED: MigrationPhase.FAILED,
    libvirt.VIR_DOMAIN_JOB_CANCELLED: MigrationPhase.CANCELLED,
}
_CONNECTION_LOST = frozenset(
    {
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_INTERNAL_ERROR,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_RPC,
    }
)
# How libvirt refuses scheduler parameters it cannot give (no cgroup CPU controller, a
# driver without them, a domain that stopped running meanwhile).
_SCHEDULER_REFUSALS = frozenset(
    {
        libvirt.VIR_ERR_OPERATION_INVALID,
        libvirt.VIR_ERR_OPERATION_FAILED,
        libvirt.VIR_ERR_NO_SUPPORT,
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
    }
)
# libvirt 8.5 and later; older bindings lack the names (the values are fixed by the API)
_PAUSED_POSTCOPY_FAILED = getattr(libvirt, "VIR_DOMAIN_PAUSED_POSTCOPY_FAILED", 13)
_RUNNING_POSTCOPY_FAILED = getattr(libvirt, "VIR_DOMAIN_RUNNING_POSTCOPY_FAILED", 11)
_MIGRATE_POSTCOPY_RESUME = getattr(libvirt, "VIR_MIGRATE_POSTCOPY_RESUME", 1 << 19)
# dirtyrate.calc_status: 0 unstarted, 1 measuring, 2 measured.
DIRTY_RATE_MEASURED = 2
DIRTY_RATE_MEASURING = 1
_MIB = 1024 * 1024
# libvirt reports an uncapped job as INT64_MAX bytes/s (in MiB/s, about 2**43): a cap
# this high or higher is none
_NO_CAP_MIB_PER_S = 1 << 40
_VCPU_PERIOD_US = 100_000
_NO_QUOTA = -1
_PARSED_CACHE_SIZE = 4096
# How a (restarted) libvirtd shows an incoming QEMU: paused for the migration, for an
# unknown reason, or starting up.
_INCOMING_PAUSE = frozenset(
    {
        libvirt.VIR_DOMAIN_PAUSED_MIGRATION,
        libvirt.VIR_DOMAIN_PAUSED_UNKNOWN,
        libvirt.VIR_DOMAIN_PAUSED_STARTING_UP,
    }
)
_event_loop_lock = threading.Lock()
_event_loop_started = False


@dataclass(frozen=True)
class DomainEvent:
    """A libvirt domain event, typed. kind: lifecycle or job-completed."""

    domain_uuid: str
    kind: str
    detail: str
    job: JobStats | None = None


@dataclass(frozen=True)
class DirtyRateReading:
    domain_uuid: str
    status: int
    rate: DirtyRate | None


@dataclass(frozen=True)
class RawDomain:
    """A domain as libvirt reports it now, before the agent adds its own knowledge."""

    config: DomainConfig
    state: DomainState
    paused_reason: int
    persistent: bool
    rss_bytes: int
    unused_bytes: int
    migrating: bool
    # a post-copy of this domain broke (source: paused; destination: running, waiting
    # for pages), see postcopy_failed()
    postcopy_failed: bool = False


def postcopy_failed(state: int, reason: int) -> bool:
    """Whether libvirt's (state, reason) says a post-copy migration broke (libvirt 8.5+):
    the source is left PAUSED/POSTCOPY_FAILED, the destination RUNNING/POSTCOPY_FAILED
    (its vCPUs run until they touch a page still on the source); both stay so until the
    migration is resumed (VIR_MIGRATE_POSTCOPY_RESUME) or a domain is destroyed."""
    return (state == libvirt.VIR_DOMAIN_PAUSED and reason == _PAUSED_POSTCOPY_FAILED) or (
        state == libvirt.VIR_DOMAIN_RUNNING and reason == _RUNNING_POSTCOPY_FAILED
    )


def _silence_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised instead."""


def start_event_loop() -> None:
    """Registers libvirt's default event loop (once per process) and runs it in a thread."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(_silence_libvirt, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # loop boundary: keep events flowing
                    LOG.exception("libvirt event loop iteration failed")

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def job_stats_from_libvirt(stats: dict[str, Any], paused_reason: int = -1) -> JobStats:
    """A raw `virDomainGetJobStats` dict as JobStats; absent keys default to 0."""
    job_type = int(stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE))
    active = job_type in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
    if paused_reason == _PAUSED_POSTCOPY_FAILED:
        # libvirt keeps the broken post-copy's job (to resume it) whatever type it shows
        phase, active = MigrationPhase.POSTCOPY_PAUSED, True
    elif job_type in _JOB_FINAL:
        phase = _JOB_FINAL[job_type]
    elif paused_reason in (libvirt.VIR_DOMAIN_PAUSED_POSTCOPY, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY):
        phase = MigrationPhase.POSTCOPY
    elif "memory_postcopy_requests" in stats and stats.get("memory_postcopy_requests", 0) > 0:
        phase = MigrationPhase.POSTCOPY
    elif int(stats.get("memory_total", 0)) == 0:
        phase = MigrationPhase.SETUP
    else:
        phase = MigrationPhase.PRECOPY
    page_size = int(stats.get("memory_page_size", 4096)) or 4096
    return JobStats(
        phase=phase,
        active=active,
        elapsed_ms=int(stats.get("time_elapsed", 0)),
        iteration=int(stats.get("memory_iteration", 0)),
        memory_total_bytes=int(stats.get("memory_total", 0)),
        memory_processed_bytes=int(stats.get("memory_processed", 0)),
        memory_remaining_bytes=int(stats.get("memory_remaining", 0)),
        data_total_bytes=int(stats.get("data_total", 0)),
        data_processed_bytes=int(stats.get("data_processed", 0)),
        data_remaining_bytes=int(stats.get("data_remaining", 0)),
        dirty_rate_bytes_per_s=float(stats.get("memory_dirty_rate", 0)) * page_size,
        bandwidth_bytes_per_s=float(stats.get("memory_bps", 0)),
        auto_converge_throttle_pct=int(stats.get("auto_converge_throttle", 0)),
        downtime_ms=int(stats.get("downtime", 0)),
        error=str(stats.get("errmsg", "")),
    )


class LibvirtDriver:
    """One libvirt connection, re-opened on demand after it is lost."""

    def __init__(
        self,
        uri: str,
        *,
        is_shared_path: Callable[[str], bool] = lambda _p: False,
        clock: Callable[[], float],
    ) -> None:
        self.uri = uri
        self._is_shared_path = is_shared_path
        self._clock = clock
        self._lock = threading.RLock()
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._listeners: list[Callable[[DomainEvent], None]] = []
        # Parsing dominates ListDomains on big hosts; a domain's XML rarely changes.
        self._parsed: OrderedDict[str, DomainConfig] = OrderedDict()

    # -- connection -----------------------------------------------------------------

    def add_listener(self, listener: Callable[[DomainEvent], None]) -> None:
        self._listeners.append(listener)

    def connect(self) -> None:
        """Opens the connection now; raises HypervisorUnavailable when libvirt is down."""
        self._connection()

    @property
    def connected(self) -> bool:
        with self._lock:
            conn = self._conn
        if conn is None:
            return False
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            self._unregister(conn)
            try:
                conn.close()
            except libvirt.libvirtError:
                LOG.debug("closing an already broken connection uri=%s", self.uri)

    def _connection(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                return self._conn
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise errors.HypervisorUnavailable(self.uri, str(e)) from e
            self._register(conn)
            self._conn = conn
            LOG.info("connected to libvirt uri=%s", self.uri)
            return conn

    def _register(self, conn: libvirt.virConnect) -> None:
        if not _event_loop_started:
            return
        try:
            conn.registerCloseCallback(self._on_close, None)
            self._callback_ids = [
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                ),
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed, None
                ),
            ]
        except libvirt.libvirtError as e:
            # The test:/// driver and old daemons lack some events; inventory still works.
            LOG.warning("libvirt events unavailable uri=%s error=%s", self.uri, e)

    def _unregister(self, conn: libvirt.virConnect) -> None:
        for cid in self._callback_ids:
            try:
                conn.domainEventDeregisterAny(cid)
            except libvirt.libvirtError:
                pass  # the connection is gone, and its callbacks with it
        self._callback_ids = []
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass  # same race: nothing left to unregister on a dead connection

    def _on_close(self, conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        LOG.warning("libvirt connection closed uri=%s reason=%s", self.uri, reason)
        with self._lock:
            if self._conn is conn:
                self._conn = None
                self._callback_ids = []

    def _emit(self, event: DomainEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # one listener's bug must not stop the event loop
                LOG.exception("domain event listener failed event=%s", event)

    def _on_lifecycle(
        self, _conn: object, dom: libvirt.virDomain, event: int, detail: int, _o: object
    ) -> None:
        self._emit(DomainEvent(dom.UUIDString(), "lifecycle", f"{event}:{detail}"))

    def _on_job_completed(
        self, _conn: object, dom: libvirt.virDomain, stats: dict[str, Any], _o: object
    ) -> None:
        # libvirt sends this event for a job that completed, and its parameters carry no
        # `type` (virDomainGetJobStats returns it apart): without one they read as running.
        typed = {"type": libvirt.VIR_DOMAIN_JOB_COMPLETED, **stats}
        self._emit(
            DomainEvent(dom.UUIDString(), "job-completed", "", job_stats_from_libvirt(typed))
        )

    @contextmanager
    def _translated(self, operation: str, domain_uuid: str = "") -> Iterator[None]:
        """Turns libvirtError into our errors by code; drops a lost connection."""
        try:
            yield
        except libvirt.libvirtError as e:
            code, origin = e.get_error_code(), e.get_error_domain()
            detail = e.get_error_message() or str(e)
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                raise errors.DomainNotFound(domain_uuid) from e
            if code in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
                raise errors.Unsupported(operation, detail) from e
            if origin in (libvirt.VIR_FROM_REMOTE, libvirt.VIR_FROM_RPC) and (
                code in _CONNECTION_LOST
            ):
                with self._lock:
                    self._conn = None
                raise errors.HypervisorUnavailable(self.uri, detail) from e
            if code in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_OPERATION_FAILED):
                raise errors.OperationRefused(domain_uuid, operation, detail) from e
            if code in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_XML_ERROR):
                raise errors.InvalidArgument(operation, detail) from e
            raise errors.HypervisorError(operation, code, detail) from e

    def _domain(self, domain_uuid: str) -> libvirt.virDomain:
        with self._translated("lookup", domain_uuid):
            return self._connection().lookupByUUIDString(domain_uuid)

    # -- inventory ------------------------------------------------------------------

    def host_info(self) -> HostInfo:
        with self._translated("host info"):
            conn = self._connection()
            cpu, host_uuid = inventory.parse_host_cpu(conn.getCapabilities())
            info = conn.getInfo()  # [arch, memory MiB, cpus, mhz, nodes, sockets, cores, threads]
            doms = conn.listAllDomains(0)
            running = sum(1 for d in doms if d.isActive())
            return HostInfo(
                hostname=conn.getHostname(),
                libvirt_uri=conn.getURI(),
                host_uuid=host_uuid,
                hypervisor_type=conn.getType(),
                hypervisor_version=_version(conn.getVersion()),
                libvirt_version=_version(conn.getLibVersion()),
                cpu=cpu,
                memory_total_bytes=int(info[1]) * _MIB,
                memory_free_bytes=int(conn.getFreeMemory()),
                cpu_count=int(info[2]),
                domain_count=len(doms),
                running_domain_count=running,
            )

    def list_domains(self) -> list[RawDomain]:
        with self._translated("list domains"):
            doms = self._connection().listAllDomains(0)
        found = []
        for dom in doms:
            try:
                found.append(self._raw_domain(dom))
            except errors.DomainNotFound:
                continue  # undefined between the listing and the lookup
        return found

    def domain(self, domain_uuid: str) -> RawDomain:
        return self._raw_domain(self._domain(domain_uuid))

    def _raw_domain(self, dom: libvirt.virDomain) -> RawDomain:
        uuid = dom.UUIDString()
        with self._translated("read domain", uuid):
            config = self._parse(dom.XMLDesc(0))
            state, reason = dom.state(0)
            active = bool(dom.isActive())
            broken = postcopy_failed(state, reason)
            stats: dict[str, int] = {}
            # Memory statistics and job info wait for a query job, which a broken
            # post-copy's kept job holds off (seen: ListDomains answered after 20 s on
            # both halves): its figures are not needed to know where it stands.
            if active and not broken:
                try:
                    stats = dom.memoryStats()
                except libvirt.libvirtError as e:
                    if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        raise
                    LOG.debug("no memory stats vm=%s error=%s", uuid, e)
            persistent = bool(dom.isPersistent())
        return RawDomain(
            config=config,
            state=_STATES.get(state, DomainState.UNKNOWN),
            paused_reason=reason if state == libvirt.VIR_DOMAIN_PAUSED else -1,
            persistent=persistent,
            rss_bytes=int(stats.get("rss", 0)) * 1024,
            unused_bytes=int(stats.get("unused", 0)) * 1024,
            migrating=active and (broken or self._job_active(dom)),
            postcopy_failed=broken,
        )

    def postcopy_state(self, domain_uuid: str) -> tuple[DomainState, bool]:
        """The domain's state and whether its post-copy broke, from virDomainGetState
        alone: it takes no job, so it answers at once while a migration job holds the
        domain (memory statistics wait for a query job, up to libvirt's 30 s, while a
        post-copy resume sets up)."""
        dom = self._domain(domain_uuid)
        with self._translated("domain state", domain_uuid):
            state, reason = dom.state(0)
        return _STATES.get(state, DomainState.UNKNOWN), postcopy_failed(state, reason)

    def paused_incoming(self) -> list[PausedIncoming]:
        """Domains paused as an incoming migration leaves them, with their vCPUs' time."""
        with self._translated("list domains"):
            doms = self._connection().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PAUSED)
        found = []
        for dom in doms:
            try:
                with self._translated("read domain", dom.UUIDString()):
                    state, reason = dom.state(0)
                    if state != libvirt.VIR_DOMAIN_PAUSED or reason not in _INCOMING_PAUSE:
                        continue
                    vcpus = dom.vcpus()[0]
                    found.append(
                        PausedIncoming(
                            domain_uuid=dom.UUIDString(),
                            name=dom.name(),
                            job_active=self._incoming_job(dom),
                            persistent=bool(dom.isPersistent()),
                            vcpu_time_ns=sum(int(v[2]) for v in vcpus),
                        )
                    )
            except errors.DomainNotFound:
                continue  # gone since the listing
        return found

    def _incoming_job(self, dom: libvirt.virDomain) -> bool:
        """Whether a job may hold the domain: only a reply of no job at all says no.

        On a migration's destination libvirt refuses job stats ("available only on the
        source host"): that refusal is an incoming migration running.
        """
        try:
            job_type = int(dom.jobInfo()[0])
        except libvirt.libvirtError:
            return True
        return job_type != int(libvirt.VIR_DOMAIN_JOB_NONE)

    def discard_incoming(self, domain_uuid: str) -> None:
        """Destroys a stale incoming copy (its QEMU is stopped, nothing is undefined)."""
        dom = self._domain(domain_uuid)
        with self._translated("destroy", domain_uuid):
            dom.destroy()

    def _parse(self, xml: str) -> DomainConfig:
        with self._lock:
            config = self._parsed.get(xml)
            if config is not None:
                self._parsed.move_to_end(xml)
                return config
        config = inventory.parse_domain_xml(xml, self._is_shared_path)
        with self._lock:
            self._parsed[xml] = config
            while len(self._parsed) > _PARSED_CACHE_SIZE:
                self._parsed.popitem(last=False)
        return config

    def _job_active(self, dom: libvirt.virDomain) -> bool:
        try:
            job_type = dom.jobInfo()[0]
        except libvirt.libvirtError:
            return False  # drivers without job support (test:///) run no jobs
        return job_type in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)

    def compare_cpu(self, cpu_xml: str) -> CpuComparison:
        with self._translated("compare CPU"):
            conn = self._connection()
            try:
                result = conn.compareHypervisorCPU(None, None, None, None, cpu_xml, 0)
                reason = ""
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_CPU_INCOMPATIBLE:
                    raise
                result, reason = libvirt.VIR_CPU_COMPARE_INCOMPATIBLE, e.get_error_message()
            if result == libvirt.VIR_CPU_COMPARE_ERROR:
                raise errors.HypervisorError("compare CPU", result, "comparison failed")
            compatible = result in (
                libvirt.VIR_CPU_COMPARE_IDENTICAL,
                libvirt.VIR_CPU_COMPARE_SUPERSET,
            )
            if not compatible and not reason:
                # Ask again in strict mode: libvirt then names what the host lacks.
                try:
                    conn.compareHypervisorCPU(
                        None,
                        None,
                        None,
                        None,
                        cpu_xml,
                        libvirt.VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE,
                    )
                except libvirt.libvirtError as e:
                    reason = e.get_error_message() or str(e)
        names = {
            libvirt.VIR_CPU_COMPARE_INCOMPATIBLE: "incompatible",
            libvirt.VIR_CPU_COMPARE_IDENTICAL: "identical",
            libvirt.VIR_CPU_COMPARE_SUPERSET: "superset",
        }
        return CpuComparison(
            compatible=compatible,
            result=names.get(result, str(result)),
            reason=reason,
            missing_features=_missing_features(reason),
        )

    # -- dirty rate -----------------------------------------------------------------

    def start_dirty_rate(self, domain_uuid: str, window_s: int, method: DirtyRateMethod) -> None:
        dom = self._domain(domain_uuid)
        with self._translated(f"dirty-rate {method}", domain_uuid):
            dom.startDirtyRateCalc(window_s, _DIRTY_MODES[method])

    def dirty_rates(self, domain_uuids: list[str]) -> list[DirtyRateReading]:
        doms = [self._domain(u) for u in domain_uuids]
        with self._translated("dirty-rate stats"):
            records = self._connection().domainListGetStats(
                doms, libvirt.VIR_DOMAIN_STATS_DIRTYRATE
            )
        readings = []
        for dom, stats in records:
            uuid = dom.UUIDString()
            status = int(stats.get("dirtyrate.calc_status", 0))
            rate = None
            if status == DIRTY_RATE_MEASURED:
                mode = str(stats.get("dirtyrate.calc_mode", DirtyRateMethod.PAGE_SAMPLING))
                period = float(stats.get("dirtyrate.calc_period", 0))
                rate = DirtyRate(
                    bytes_per_s=float(stats.get("dirtyrate.megabytes_per_second", 0)) * _MIB,
                    window_s=period,
                    method=DirtyRateMethod(mode),
                    measured_at=float(stats.get("dirtyrate.calc_start_time", 0)) + period,
                )
            readings.append(DirtyRateReading(uuid, status, rate))
        return readings

    # -- migration jobs ---------------------------------------------------------------

    def job_stats(self, domain_uuid: str, completed: bool = False) -> JobStats | None:
        """The running job's stats (or the last completed job's); None when there is none."""
        dom = self._domain(domain_uuid)
        with self._translated("job stats", domain_uuid):
            if not completed and not dom.isActive():
                return None  # shut off (or just migrated away and not yet undefined): no job
            flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0
            try:
                # The bindings answer None rather than raise once the domain is gone.
                raw = dom.jobStats(flags) or {}
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or completed:
                    raise
                return None  # race: the domain stopped (migrated away) since isActive()
            state, reason = dom.state(0) or (libvirt.VIR_DOMAIN_NOSTATE, 0)
        if (
            not completed
            and state == libvirt.VIR_DOMAIN_PAUSED
            and reason == _PAUSED_POSTCOPY_FAILED
        ):
            # The broken post-copy's job is kept for its resume; libvirt may report it
            # with or without statistics, and as no job at all between two API calls.
            return job_stats_from_libvirt(raw, _PAUSED_POSTCOPY_FAILED)
        if int(raw.get("type", libvirt.VIR_DOMAIN_JOB_NONE)) == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        operation = raw.get("operation")
        if operation is not None and operation not in (
            libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT,
        ):
            return None  # a save, dump or snapshot job: not ours to watch
        postcopy = (
            state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY
        ) or (state == libvirt.VIR_DOMAIN_RUNNING and reason == libvirt.VIR_DOMAIN_RUNNING_POSTCOPY)
        return job_stats_from_libvirt(raw, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY if postcopy else -1)

    def max_downtime_ms(self, domain_uuid: str) -> int:
        dom = self._domain(domain_uuid)
        with self._translated("get max downtime", domain_uuid):
            value = dom.migrateGetMaxDowntime(0)
        if value is None:  # the bindings answer None once the job is gone
            raise errors.OperationRefused(domain_uuid, "get max downtime", "no migration job")
        return int(value)

    def set_max_downtime(self, domain_uuid: str, downtime_ms: int) -> None:
        dom = self._domain(domain_uuid)
        with self._translated("set max downtime", domain_uuid):
            dom.migrateSetMaxDowntime(downtime_ms, 0)

    def max_speed(self, domain_uuid: str) -> int:
        """The migration job's bandwidth cap in bytes/s; 0 when there is none."""
        dom = self._domain(domain_uuid)
        with self._translated("get bandwidth", domain_uuid):
            mib_per_s = int(dom.migrateGetMaxSpeed(0))
        return 0 if mib_per_s >= _NO_CAP_MIB_PER_S else mib_per_s * _MIB

    def set_max_speed(self, domain_uuid: str, bandwidth_bytes_per_s: int) -> None:
        dom = self._domain(domain_uuid)
        mib_per_s = 0 if bandwidth_bytes_per_s == 0 else max(1, bandwidth_bytes_per_s // _MIB)
        with self._translated("set bandwidth", domain_uuid):
            dom.migrateSetMaxSpeed(mib_per_s, 0)

    def start_postcopy(self, domain_uuid: str) -> None:
        dom = self._domain(domain_uuid)
        with self._translated("start post-copy", domain_uuid):
            dom.migrateStartPostCopy(0)

    def abort_job(self, domain_uuid: str) -> None:
        dom = self._domain(domain_uuid)
        with self._translated("abort job", domain_uuid):
            dom.abortJob()

    def set_vcpu_quota(self, domain_uuid: str, quota_pct: int) -> None:
        """Caps each vCPU at quota_pct% of a core (100 lifts the cap), live."""
        dom = self._domain(domain_uuid)
        quota = _NO_QUOTA if quota_pct >= 100 else max(1000, _VCPU_PERIOD_US * quota_pct // 100)
        with self._translated("vcpu quota", domain_uuid):
            dom.setSchedulerParametersFlags(
                {"vcpu_period": _VCPU_PERIOD_US, "vcpu_quota": quota},
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )

    def vcpu_scheduler(self) -> SchedulerReading | None:
        """The live scheduler parameters of a running domain (the first that answers), where
        libvirt shows whether it can cap vCPUs; None when no domain runs. libvirt's refusal
        (QEMU without the cgroup CPU controller: "cgroup CPU controller is not mounted") is
        the reading's error."""
        with self._translated("scheduler parameters"):
            for dom in self._connection().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                name, scheduler = "", ""
                try:
                    name = dom.name()
                    scheduler = str(dom.schedulerType()[0])
                    # a running domain's current parameters are its live ones (the flagged
                    # call is refused by the test:/// driver)
                    params = dom.schedulerParameters()
                except libvirt.libvirtError as e:
                    code = e.get_error_code()
                    if code == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # stopped since the listing
                    if code not in _SCHEDULER_REFUSALS:
                        raise  # translated (a lost connection among them)
                    return SchedulerReading(name, scheduler, (), e.get_error_message() or str(e))
                return SchedulerReading(name, scheduler, tuple(sorted(params or {})))
        return None

    def migrate(self, request: MigrationRequest, *, resume: bool = False) -> None:
        """Runs a live peer-to-peer migration to the end; raises on failure or abort.

        resume: resume the domain's broken post-copy instead (libvirt 8.5+): the same
        destination, flags and parameters as the migration that broke, plus
        VIR_MIGRATE_POSTCOPY_RESUME. libvirt refuses it unless its source job is in the
        post-copy-failed phase and QEMU reports postcopy-paused; it then blocks until the
        post-copy completes, or raises when it breaks again (the domain stays paused)."""
        dom = self._domain(request.domain_uuid)
        with self._translated("migrate", request.domain_uuid):
            persistent = bool(dom.isPersistent())
        flags, params = migration_call(request, persistent=persistent)
        if resume:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY | _MIGRATE_POSTCOPY_RESUME
        LOG.info(
            "migration %s vm=%s dest=%s uri=%s flags=%#x",
            "resuming" if resume else "starting",
            request.domain_uuid,
            request.destination_uri,
            request.migration_uri,
            flags,
        )
        operation = "resume post-copy" if resume else "migrate"
        with self._translated(operation, request.domain_uuid), self._own_connection() as conn:
            # migrateToURI3 blocks for the whole migration; on the shared connection it
            # stalls other callers' replies (seen: job stats answered seconds late).
            own = dom if conn is None else conn.lookupByUUIDString(request.domain_uuid)
            own.migrateToURI3(request.destination_uri, params, flags)

    @contextmanager
    def _own_connection(self) -> Iterator[libvirt.virConnect | None]:
        """A connection of its own for a long call; None for the in-process test driver."""
        if self.uri.startswith("test:"):
            yield None  # each open of a test:/// file would be another, empty, host
            return
        conn = libvirt.open(self.uri)
        try:
            yield conn
        finally:
            try:
                conn.close()
            except libvirt.libvirtError:
                LOG.debug("closing a broken migration connection uri=%s", self.uri)


def _version(packed: int) -> str:
    major, rest = divmod(int(packed), 1_000_000)
    minor, micro = divmod(rest, 1000)
    return f"{major}.{minor}.{micro}"


def _missing_features(reason: str) -> tuple[str, ...]:
    """libvirt says 'Host CPU does not provide required features: a, b'."""
    marker = "required features:"
    if marker not in reason:
        return ()
    tail = reason.split(marker, 1)[1]
    return tuple(f.strip() for f in tail.split(",") if f.strip())


def migration_call(request: MigrationRequest, *, persistent: bool) -> tuple[int, dict[str, Any]]:
    """The flags and parameters of migrateToURI3 for a request (the same for its resume)."""
    params: dict[str, Any] = {}
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
    if persistent:
        flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    if request.migration_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = request.migration_uri
    if request.bandwidth_bytes_per_s:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, request.bandwidth_bytes_per_s // _MIB)
    if request.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if request.auto_converge_initial_pct:
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = (
                request.auto_converge_initial_pct
            )
        if request.auto_converge_increment_pct:
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = (
                request.auto_converge_increment_pct
            )
    if request.allow_postcopy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    if request.parallel_connections > 1:
        flags |= libvirt.VIR_MIGRATE_PARALLEL
        params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = request.parallel_connections
    if request.copy_storage:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
    return flags, params
