"""What the coordinator needs from a cloud to drain a host: the driver contract.

A driver is synchronous and small: the executor calls it from its own
threads and polls migrations. Values are frozen dataclasses; states are
string enums so they read well in logs. Every failure of a driver call is one
of the errors below, carrying its details as attributes.
"""

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class InstanceState(enum.StrEnum):
    """The power/lifecycle state of a VM as the cloud reports it."""

    ACTIVE = "active"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    SUSPENDED = "suspended"
    # The cloud marks the VM failed (Nova's vm_state error), whatever runs.
    ERROR = "error"
    OTHER = "other"


class MigrationKind(enum.StrEnum):
    LIVE = "live"
    COLD = "cold"


class TargetHalf(enum.StrEnum):
    """What is left on the target of a post-copy whose link broke."""

    PRESENT = "present"  # the target holds the guest (paused there, waiting for its pages)
    GONE = "gone"  # the target answers and has no copy of the guest any more
    UNREACHABLE = "unreachable"  # the target (its agent or libvirt) does not answer


class MigrationState(enum.StrEnum):
    """Where a migration stands, across clouds.

    `awaiting_confirm` is a cold migration that has moved the VM and waits
    for `confirm_migration`.
    """

    QUEUED = "queued"
    PREPARING = "preparing"
    RUNNING = "running"
    AWAITING_CONFIRM = "awaiting_confirm"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ERROR = "error"
    UNKNOWN = "unknown"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {
        MigrationState.COMPLETED,
        MigrationState.FAILED,
        MigrationState.CANCELLED,
        MigrationState.ERROR,
    }
)


@dataclass(frozen=True)
class ServerGroup:
    """A placement rule a VM belongs to (affinity, anti-affinity, ...)."""

    id: str
    name: str
    policy: str


@dataclass(frozen=True)
class Instance:
    uuid: str
    name: str
    host: str | None
    project_id: str
    state: InstanceState
    task_state: str | None
    flavor_name: str
    vcpus: int
    memory_mb: int
    server_groups: tuple[ServerGroup, ...] = ()


@dataclass(frozen=True)
class ComputeHost:
    """A compute host; resource figures are None when the cloud hides them."""

    name: str
    enabled: bool
    up: bool
    disabled_reason: str | None
    vcpus: int | None = None
    vcpus_used: int | None = None
    memory_mb: int | None = None
    free_memory_mb: int | None = None


@dataclass(frozen=True)
class MigrationRef:
    """Names one migration of one VM."""

    instance_uuid: str
    migration_id: int
    kind: MigrationKind
    migration_uuid: str | None = None


@dataclass(frozen=True)
class MigrationStatus:
    ref: MigrationRef
    state: MigrationState
    cloud_status: str
    source_host: str | None
    dest_host: str | None
    memory_total_bytes: int | None = None
    memory_processed_bytes: int | None = None
    memory_remaining_bytes: int | None = None
    disk_total_bytes: int | None = None
    disk_processed_bytes: int | None = None
    disk_remaining_bytes: int | None = None


@dataclass(frozen=True)
class LiveMigrationOptions:
    """How to start a live migration, where the driver controls it.

    The libvirt driver applies these; Nova starts its migrations with what
    nova.conf permits and ignores them (the agents tune Nova's jobs instead).
    """

    max_downtime_ms: int = 0
    auto_converge: bool = False
    allow_postcopy: bool = False
    bandwidth_bytes_per_s: int = 0
    migration_uri: str = ""

    def describe(self) -> dict[str, object]:
        return {
            "max_downtime_ms": self.max_downtime_ms,
            "auto_converge": self.auto_converge,
            "allow_postcopy": self.allow_postcopy,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "migration_uri": self.migration_uri,
        }


class DriverError(Exception):
    """A driver call failed; `status` is the cloud's answer when there was one."""

    def __init__(
        self,
        message: str,
        *,
        method: str | None = None,
        path: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.path = path
        self.status = status

    def __str__(self) -> str:
        where = f" ({self.method} {self.path} -> {self.status})" if self.method else ""
        return f"{self.message}{where}"


class InvalidRequest(DriverError):
    """The cloud refused the request as malformed or unsupported (400)."""


class Forbidden(DriverError):
    """Our credentials may not do this (401, 403)."""


class NotFound(DriverError):
    """The VM, host, service or migration does not exist (404)."""


class Conflict(DriverError):
    """The request is valid but not now: wrong state, no such target (409)."""


class Unavailable(DriverError):
    """The cloud did not answer usably: transport error, timeout or 5xx.

    `attempts` is how many times the request was sent; `may_have_acted` is
    True when an action may have been carried out although no answer came
    (the caller re-checks state instead of repeating it).
    """

    def __init__(
        self,
        message: str,
        *,
        method: str | None = None,
        path: str | None = None,
        status: int | None = None,
        attempts: int = 1,
        elapsed_s: float = 0.0,
        may_have_acted: bool = False,
    ) -> None:
        super().__init__(message, method=method, path=path, status=status)
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.may_have_acted = may_have_acted


class MigrationDriver(Protocol):
    """Drives VM migrations on a cloud; every method may raise a DriverError."""

    @property
    def can_cold_migrate(self) -> bool:
        """Whether `cold_migrate` can move a VM on this cloud; when it cannot, a drain
        leaves the VMs that cannot move live in place."""

    @property
    def error_settle_s(self) -> float:
        """How long after a live migration failed for good the cloud may still mark the VM
        failed (see `reset_to_active`); 0 for a cloud that never does."""

    def disable_host(self, host: str, reason: str) -> None:
        """Stop new VMs landing on `host`, recording `reason`."""

    def enable_host(self, host: str) -> None: ...

    def host_enabled(self, host: str) -> bool: ...

    def list_hosts(self) -> list[ComputeHost]: ...

    def list_instances(self, host: str) -> list[Instance]:
        """Every VM on `host`, whatever its project."""

    def get_instance(self, instance_uuid: str) -> Instance:
        """One VM, wherever it runs now (its `host` says where)."""

    def start_live_migration(
        self,
        instance_uuid: str,
        target_host: str | None = None,
        block_migration: bool | None = None,
        options: LiveMigrationOptions | None = None,
    ) -> MigrationRef:
        """Start a live migration; no target lets the cloud's scheduler choose.

        `block_migration` None lets the cloud decide from the storage.
        """

    def latest_migration(self, instance_uuid: str) -> MigrationRef | None:
        """The newest migration of a VM: to re-check after an uncertain action."""

    def get_migration(self, ref: MigrationRef) -> MigrationStatus: ...

    def force_complete(self, ref: MigrationRef) -> None:
        """Make a running live migration finish now (pause or post-copy)."""

    def abort(self, ref: MigrationRef) -> None: ...

    @property
    def can_resume_postcopy(self) -> bool:
        """Whether `resume_postcopy` can resume a post-copy whose link broke on this cloud;
        when it cannot, such a VM is reported stranded at once."""

    def resume_postcopy(self, ref: MigrationRef, migration_uri: str = "") -> None:
        """Resume a post-copy whose link broke, to the same target (libvirt's
        VIR_MIGRATE_POSTCOPY_RESUME); raises while the link or the target is down."""

    def postcopy_target(self, ref: MigrationRef) -> TargetHalf:
        """What is left on the target of a post-copy whose link broke."""

    def reset_to_active(self, instance_uuid: str) -> None:
        """Clear the error state the cloud left on a VM whose live migration failed or was
        aborted, though the VM still runs where it was (Nova 34.0.0 does so for every
        aborted live migration). The caller checks first, through the host's agent, that
        the VM runs there."""

    def cold_migrate(self, instance_uuid: str, target_host: str | None = None) -> MigrationRef: ...

    def confirm_migration(self, ref: MigrationRef) -> None:
        """Confirm a cold migration in `awaiting_confirm`."""


@runtime_checkable
class HostAggregates(Protocol):
    """A cloud that groups its hosts in named aggregates (a roll of one aggregate)."""

    def aggregate_hosts(self, name: str) -> list[str]:
        """The hosts of aggregate `name`; NotFound when there is none."""
