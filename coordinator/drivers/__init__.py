"""Migration drivers: how the coordinator moves VMs on a given cloud."""

from hostmaint.coordinator.drivers.base import (
    ComputeHost,
    Conflict,
    DriverError,
    Forbidden,
    Instance,
    InstanceState,
    InvalidRequest,
    MigrationDriver,
    MigrationKind,
    MigrationRef,
    MigrationState,
    MigrationStatus,
    NotFound,
    ServerGroup,
    Unavailable,
)

__all__ = [
    "ComputeHost",
    "Conflict",
    "DriverError",
    "Forbidden",
    "Instance",
    "InstanceState",
    "InvalidRequest",
    "MigrationDriver",
    "MigrationKind",
    "MigrationRef",
    "MigrationState",
    "MigrationStatus",
    "NotFound",
    "ServerGroup",
    "Unavailable",
]
