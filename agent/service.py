"""The agent's operations, in domain terms; the gRPC servicer only translates."""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, urlsplit

from hostmaint.agent import capabilities, errors, hoststats, inventory, kernel
from hostmaint.agent.dirtyrate import DirtyRateMeter, validate_window
from hostmaint.agent.libvirt_driver import LibvirtDriver
from hostmaint.agent.migrations import MigrationTracker, Sample, Tuned
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
    TuningCapabilities,
)

LOG = logging.getLogger(__name__)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DEST_SCHEMES = ("qemu+tcp", "qemu+tls", "qemu+ssh", "qemu+unix", "qemu")
# libvirt URI parameters a destination may carry; others (command=, netcat=,
# no_verify=) would run programs or weaken the transport's checks.
_DEST_PARAMS = frozenset(
    {"socket", "pkipath", "keyfile", "known_hosts", "known_hosts_verify", "sshauth", "no_tty"}
)
_MIGRATION_URI = re.compile(
    r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(?::(?P<port>[0-9]{1,5}))?/?$"
)
_PRINTABLE = re.compile(r"^[\x21-\x7e]*$")
MAX_WATCH_INTERVAL_S = 60.0
MIN_WATCH_INTERVAL_S = 0.05
MAX_START_TIMEOUT_S = 3600.0
MAX_UUIDS = 4096
MAX_URI_CHARS = 1024
MAX_CPU_XML_CHARS = 65536
MAX_CPU_NAME_CHARS = 128
MAX_CPU_FEATURES = 512
CPU_FEATURE_POLICIES = frozenset({"", "require", "disable", "optional", "force", "forbid"})
MAX_DOWNTIME_MS = 2_000_000  # QEMU's maximum: 2000 s
MAX_BANDWIDTH_BYTES_PER_S = 1 << 40  # 1 TiB/s, far above any NIC
MAX_PARALLEL_CONNECTIONS = 255


def check_uuid(value: str, field: str = "domain_uuid") -> str:
    if not _UUID.match(value or ""):
        raise errors.InvalidArgument(field, f"{value[:64]!r} is not a UUID")
    return value.lower()


def check_uuids(values: Sequence[str], field: str = "domain_uuids") -> list[str]:
    if len(values) > MAX_UUIDS:
        raise errors.InvalidArgument(field, f"at most {MAX_UUIDS} uuids")
    return [check_uuid(u, field) for u in values]


def check_range(field: str, value: float, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise errors.InvalidArgument(field, f"must be from {low:g} to {high:g}, not {value:g}")


def _check_name(field: str, value: str) -> None:
    if len(value) > MAX_CPU_NAME_CHARS or not _PRINTABLE.match(value):
        raise errors.InvalidArgument(
            field, f"must be at most {MAX_CPU_NAME_CHARS} printable characters without spaces"
        )


def check_cpu_definition(cpu: CpuDefinition) -> CpuDefinition:
    if len(cpu.xml) > MAX_CPU_XML_CHARS:
        raise errors.InvalidArgument("cpu.xml", f"at most {MAX_CPU_XML_CHARS} characters")
    for field in ("mode", "model", "vendor", "arch"):
        _check_name(f"cpu.{field}", getattr(cpu, field))
    if len(cpu.features) > MAX_CPU_FEATURES:
        raise errors.InvalidArgument("cpu.features", f"at most {MAX_CPU_FEATURES}")
    for f in cpu.features:
        _check_name("cpu.features.name", f.name)
        if f.policy not in CPU_FEATURE_POLICIES:
            raise errors.InvalidArgument("cpu.features.policy", f"{f.policy[:32]!r} is unknown")
    if not cpu.xml and not cpu.model and not cpu.features:
        raise errors.InvalidArgument("cpu", "needs xml, a model or features")
    if cpu.xml:
        cpu = replace(cpu, xml=cpu.xml.strip())
        if not cpu.xml.startswith("<cpu"):
            raise errors.InvalidArgument("cpu.xml", "must be a <cpu> element")
    return cpu


def check_destination_uri(uri: str) -> str:
    """A qemu libvirt URI with only harmless parameters; returns its host name ('' if none)."""
    if len(uri) > MAX_URI_CHARS or not _PRINTABLE.match(uri):
        raise errors.InvalidArgument(
            "destination_uri", f"must be at most {MAX_URI_CHARS} printable characters"
        )
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise errors.InvalidArgument("destination_uri", f"not a URI: {e}") from e
    if parts.scheme not in _DEST_SCHEMES or not uri.startswith(f"{parts.scheme}://"):
        raise errors.InvalidArgument(
            "destination_uri", "must be a qemu libvirt URI (qemu+tcp://, qemu+tls://, ...)"
        )
    if parts.username or parts.password or parts.fragment:
        raise errors.InvalidArgument("destination_uri", "must not carry a user or a fragment")
    unknown = sorted({k for k, _ in parse_qsl(parts.query)} - _DEST_PARAMS)
    if unknown:
        raise errors.InvalidArgument("destination_uri", f"parameters not allowed: {unknown}")
    return host


def check_migration_uri(uri: str) -> str:
    """tcp://host[:port]; returns the host (without brackets)."""
    m = _MIGRATION_URI.match(uri)
    if m is None or len(uri) > MAX_URI_CHARS:
        raise errors.InvalidArgument("migration_uri", "must be tcp://host[:port]")
    if m["port"] is not None and not 1 <= int(m["port"]) <= 65535:
        raise errors.InvalidArgument("migration_uri", "port must be from 1 to 65535")
    return m["host"].strip("[]")


def _uri_matches(uri: str, entry: str) -> bool:
    """Exact, or a shell-style pattern when the entry has * or [ (a ? alone is literal:
    libvirt URIs carry their parameters after one)."""
    if uri == entry:
        return True
    return ("*" in entry or "[" in entry) and fnmatch.fnmatchcase(uri, entry)


@dataclass(frozen=True)
class DestinationPolicy:
    """Where this agent may send domains: libvirt URIs and migration stream hosts.

    Empty `destinations` refuses every migration: an agent must be told its peers.
    """

    destinations: tuple[str, ...]
    migration_hosts: tuple[str, ...] = ()

    def check(self, destination_uri: str, destination_host: str, migration_host: str) -> None:
        if not self.destinations:
            raise errors.InvalidArgument(
                "destination_uri",
                "this agent allows no destinations ([migration] allowed_destinations is empty)",
            )
        if not any(_uri_matches(destination_uri, d) for d in self.destinations):
            raise errors.InvalidArgument(
                "destination_uri", f"{destination_uri[:128]} is not an allowed destination"
            )
        if migration_host and not self._host_allowed(migration_host, destination_host):
            raise errors.InvalidArgument(
                "migration_uri", f"host {migration_host} is not an allowed migration host"
            )

    def check_migration_host(self, migration_host: str) -> None:
        if not self._host_allowed(migration_host, ""):
            raise errors.InvalidArgument(
                "migration_uri", f"host {migration_host} is not an allowed migration host"
            )

    def _host_allowed(self, host: str, destination_host: str) -> bool:
        if destination_host and host.lower() == destination_host.lower():
            return True
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
                host
            )
        except ValueError:
            address = None
        for entry in self.migration_hosts:
            if address is not None:
                try:
                    if address in ipaddress.ip_network(entry, strict=False):
                        return True
                except ValueError:
                    pass
            if fnmatch.fnmatchcase(host.lower(), entry.lower()):
                return True
        return False


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
        allowed_migration_hosts: Sequence[str] = (),
    ) -> None:
        self.driver = driver
        self.meter = meter
        self.tracker = tracker
        self._default_window_s = default_window_s
        self._default_watch_interval_s = default_watch_interval_s
        self._migration_interface = migration_interface
        self._destinations = DestinationPolicy(
            tuple(d.strip() for d in allowed_destinations if d.strip()),
            tuple(h.strip() for h in allowed_migration_hosts if h.strip()),
        )

    def host(self) -> tuple[HostInfo, HostLoad, TuningCapabilities]:
        info = self.driver.host_info()
        names = [
            d.config.name for d in self.driver.list_domains() if d.state is DomainState.RUNNING
        ]
        load = hoststats.read_host_load(names, self._migration_interface)
        return info, load, self.capabilities(info, names)

    def capabilities(self, info: HostInfo, running: Sequence[str]) -> TuningCapabilities:
        """The tuning this host can do (``capabilities``), from libvirt and the kernel."""
        return TuningCapabilities(
            vcpu_throttle=capabilities.vcpu_throttle(
                self.driver.vcpu_scheduler(), kernel.cgroup_cpu(), info.hypervisor_type
            ),
            postcopy=capabilities.postcopy(
                kernel.probe_userfaultfd(),
                hoststats.qemu_uids(running),
                info.hypervisor_type,
                info.hypervisor_version,
            ),
        )

    def domains(self, domain_uuids: Sequence[str] = ()) -> list[Domain]:
        wanted = check_uuids(domain_uuids)
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
                    dirty_rates=self.meter.series(uuid),
                    vcpu_throttle_pct=self.tracker.vcpu_throttle_pct(uuid),
                    postcopy_failed=raw.postcopy_failed,
                )
            )
        return found

    def measure_dirty_rate(
        self, domain_uuids: Sequence[str], window_s: float, method: DirtyRateMethod | None
    ) -> dict[str, DirtyRate]:
        if not math.isfinite(window_s):
            raise errors.InvalidArgument("window_s", "must be a number of seconds")
        window = validate_window(window_s) if window_s else self._default_window_s
        wanted = check_uuids(domain_uuids)
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
        cpu = check_cpu_definition(cpu)
        return self.driver.compare_cpu(inventory.cpu_xml(cpu))

    def watch(
        self, domain_uuid: str, interval_s: float, start_timeout_s: float
    ) -> Iterator[Sample]:
        uuid = check_uuid(domain_uuid)
        if not math.isfinite(interval_s) or not math.isfinite(start_timeout_s):
            raise errors.InvalidArgument("interval_s/start_timeout_s", "must be numbers")
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
        lower_max_downtime: bool = False,
    ) -> Tuned:
        uuid = check_uuid(domain_uuid)
        if vcpu_throttle_pct is not None and not 0 <= vcpu_throttle_pct <= 99:
            raise errors.InvalidArgument("vcpu_throttle_pct", "must be between 0 and 99")
        if max_downtime_ms is not None:
            check_range("max_downtime_ms", max_downtime_ms, 1, MAX_DOWNTIME_MS)
        if bandwidth_bytes_per_s is not None:
            check_range(
                "bandwidth_bytes_per_s", bandwidth_bytes_per_s, 0, MAX_BANDWIDTH_BYTES_PER_S
            )
        if lower_max_downtime and max_downtime_ms is None:
            raise errors.InvalidArgument("lower_max_downtime", "needs max_downtime_ms")
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
            lower_max_downtime=lower_max_downtime,
        )

    def migrate(self, request: MigrationRequest) -> float:
        """Checks the request's form, the domain, then the destination policy; then starts."""
        uuid = check_uuid(request.domain_uuid)
        dest = request.destination_uri
        dest_host = check_destination_uri(dest)
        migration_host = check_migration_uri(request.migration_uri) if request.migration_uri else ""
        check_range("max_downtime_ms", request.max_downtime_ms, 0, MAX_DOWNTIME_MS)
        check_range(
            "bandwidth_bytes_per_s", request.bandwidth_bytes_per_s, 0, MAX_BANDWIDTH_BYTES_PER_S
        )
        check_range(
            "parallel_connections", request.parallel_connections, 0, MAX_PARALLEL_CONNECTIONS
        )
        for pct_field in ("auto_converge_initial_pct", "auto_converge_increment_pct"):
            check_range(pct_field, getattr(request, pct_field), 0, 100)
        raw = self.driver.domain(uuid)  # NOT_FOUND and a stopped domain before the policy
        if raw.state is not DomainState.RUNNING:
            raise errors.OperationRefused(
                uuid, "migrate", f"the domain is {raw.state}, not running"
            )
        self._destinations.check(dest, dest_host, migration_host)
        LOG.info(
            "migration allowed vm=%s dest=%s migration_uri=%s",
            uuid,
            dest,
            request.migration_uri or "-",
        )
        return self.tracker.migrate(replace(request, domain_uuid=uuid))

    def resume(
        self, domain_uuid: str, destination_uri: str, migration_uri: str
    ) -> MigrationRequest:
        """Resumes a broken post-copy (the destination, when named, passes the same
        policy as a migration's); returns the request it resumed with."""
        uuid = check_uuid(domain_uuid)
        migration_host = check_migration_uri(migration_uri) if migration_uri else ""
        if destination_uri:
            dest_host = check_destination_uri(destination_uri)
            self._destinations.check(destination_uri, dest_host, migration_host)
        elif migration_host:
            # the original destination's host is the tracker's to know: the policy's
            # migration hosts decide alone
            self._destinations.check_migration_host(migration_host)
        LOG.info(
            "post-copy resume asked vm=%s dest=%s migration_uri=%s",
            uuid,
            destination_uri or "(as started)",
            migration_uri or "-",
        )
        return self.tracker.resume(uuid, destination_uri, migration_uri)
