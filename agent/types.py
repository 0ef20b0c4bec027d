"""Typed values the agent reads from libvirt. No libvirt types leave the driver."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class DomainState(enum.StrEnum):
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    UNKNOWN = "unknown"


class DirtyRateMethod(enum.StrEnum):
    PAGE_SAMPLING = "page-sampling"
    DIRTY_BITMAP = "dirty-bitmap"
    DIRTY_RING = "dirty-ring"


class BlockerKind(enum.StrEnum):
    NOT_RUNNING = "not-running"
    HOST_DEVICE = "host-device"
    PCI_PASSTHROUGH = "pci-passthrough"
    LOCAL_DISK = "local-disk"
    MIGRATION_RUNNING = "migration-running"


class MigrationPhase(enum.StrEnum):
    SETUP = "setup"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    # the post-copy's link broke: paused on the source, waiting on the destination, until
    # it is resumed (libvirt's state reason postcopy-failed, QEMU's postcopy-paused)
    POSTCOPY_PAUSED = "postcopy_paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (MigrationPhase.COMPLETED, MigrationPhase.FAILED, MigrationPhase.CANCELLED)


@dataclass(frozen=True)
class CpuFeature:
    name: str
    policy: str = ""


@dataclass(frozen=True)
class CpuDefinition:
    mode: str = ""
    model: str = ""
    vendor: str = ""
    arch: str = ""
    features: tuple[CpuFeature, ...] = ()
    xml: str = ""


@dataclass(frozen=True)
class NovaInstance:
    instance_uuid: str
    name: str = ""
    flavor_name: str = ""
    project_uuid: str = ""
    user_uuid: str = ""


@dataclass(frozen=True)
class Disk:
    target: str
    device: str
    source_type: str
    source: str
    shared: bool
    readonly: bool


@dataclass(frozen=True)
class Blocker:
    kind: BlockerKind
    reason: str
    hard: bool


@dataclass(frozen=True)
class DirtyRate:
    bytes_per_s: float
    window_s: float
    method: DirtyRateMethod
    measured_at: float  # seconds since the epoch


@dataclass(frozen=True)
class HostDevice:
    """A <hostdev> or an <interface type='hostdev'> of a domain."""

    kind: str  # pci, usb, scsi, mdev, ...
    address: str


@dataclass(frozen=True)
class DomainConfig:
    """What the domain's XML says, parsed (pure, see inventory.parse_domain_xml)."""

    uuid: str
    name: str
    memory_max_bytes: int
    memory_current_bytes: int
    vcpus: int
    cpu: CpuDefinition
    disks: tuple[Disk, ...]
    host_devices: tuple[HostDevice, ...]
    nova: NovaInstance | None
    dirty_ring: bool = False


@dataclass(frozen=True)
class Domain:
    config: DomainConfig
    state: DomainState
    persistent: bool
    rss_bytes: int
    unused_bytes: int
    migrating: bool
    blockers: tuple[Blocker, ...]
    dirty_rate: DirtyRate | None = None
    vcpu_throttle_pct: int = 0
    dirty_rates: tuple[DirtyRate, ...] = ()  # the latest over each window, shortest first
    postcopy_failed: bool = False

    @property
    def uuid(self) -> str:
        return self.config.uuid


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    libvirt_uri: str
    host_uuid: str
    hypervisor_type: str
    hypervisor_version: str
    libvirt_version: str
    cpu: CpuDefinition
    memory_total_bytes: int
    memory_free_bytes: int
    cpu_count: int
    domain_count: int
    running_domain_count: int


@dataclass(frozen=True)
class HostLoad:
    """Host figures libvirt does not give, read from the OS."""

    load_1m: float
    load_5m: float
    load_15m: float
    qemu_rss_bytes: int
    migration_interface: str
    migration_nic_speed_mbps: int


@dataclass(frozen=True)
class SchedulerReading:
    """A running domain's live scheduler parameters, as libvirt gives them (or refuses)."""

    domain_name: str
    scheduler: str  # libvirt's scheduler type: posix (QEMU's cgroups), fair (test:///)
    parameters: tuple[str, ...]  # the names, e.g. cpu_shares, vcpu_period, vcpu_quota
    error: str = ""  # libvirt's refusal, e.g. "cgroup CPU controller is not mounted"


@dataclass(frozen=True)
class CgroupCpu:
    """The cgroup CPU controller as the host mounts it (read from /proc and /sys)."""

    version: str  # v1, v2; empty when no hierarchy has the CPU controller
    bandwidth: bool  # CFS quotas: cpu.cfs_quota_us (v1), cpu.max (v2)
    where: str  # what was read


@dataclass(frozen=True)
class UserfaultfdProbe:
    """What the kernel says of userfaultfd, the syscall QEMU's post-copy relies on."""

    syscall: str  # "ok", the errno's name when refused (ENOSYS: none), "" when not tried
    unprivileged_sysctl: int | None  # /proc/sys/vm/unprivileged_userfaultfd; None: absent
    device: bool  # /dev/userfaultfd exists (Linux 6.1 and later)


@dataclass(frozen=True)
class Capability:
    available: bool
    reason: str = ""  # why not, when not available
    decided_by: str = ""  # what the agent read or tried


@dataclass(frozen=True)
class TuningCapabilities:
    vcpu_throttle: Capability
    postcopy: Capability


@dataclass(frozen=True)
class CpuComparison:
    compatible: bool
    result: str  # incompatible, identical, superset
    reason: str
    missing_features: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobStats:
    """One sample of a migration job, with defaults for keys old libvirt lacks."""

    phase: MigrationPhase
    active: bool
    elapsed_ms: int = 0
    iteration: int = 0
    memory_total_bytes: int = 0
    memory_processed_bytes: int = 0
    memory_remaining_bytes: int = 0
    data_total_bytes: int = 0
    data_processed_bytes: int = 0
    data_remaining_bytes: int = 0
    dirty_rate_bytes_per_s: float = 0.0
    bandwidth_bytes_per_s: float = 0.0
    auto_converge_throttle_pct: int = 0
    downtime_ms: int = 0
    error: str = ""


@dataclass(frozen=True)
class MigrationRequest:
    domain_uuid: str
    destination_uri: str
    migration_uri: str = ""
    bandwidth_bytes_per_s: int = 0
    max_downtime_ms: int = 0
    auto_converge: bool = False
    auto_converge_initial_pct: int = 0
    auto_converge_increment_pct: int = 0
    allow_postcopy: bool = False
    parallel_connections: int = 0
    copy_storage: bool = False
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PausedIncoming:
    """A domain paused the way an incoming migration leaves it (paused for the migration,
    for an unknown reason or starting up), as libvirt shows it now.

    vcpu_time_ns: the CPU time its vCPUs have run, summed; near zero for a copy whose guest
    never ran on this host.
    """

    domain_uuid: str
    name: str
    job_active: bool
    persistent: bool
    vcpu_time_ns: int
