"""The agent's errors. Each carries its fields; the servicer maps them to gRPC codes."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent reports to its callers."""


class InvalidArgument(AgentError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class DomainNotFound(AgentError):
    def __init__(self, domain_uuid: str) -> None:
        super().__init__(f"no domain with uuid {domain_uuid} on this host")
        self.domain_uuid = domain_uuid


class HypervisorUnavailable(AgentError):
    """libvirt cannot be reached (daemon down or restarting); retry later."""

    def __init__(self, uri: str, detail: str) -> None:
        super().__init__(f"libvirt at {uri} is unavailable: {detail}")
        self.uri = uri
        self.detail = detail


class Unsupported(AgentError):
    """The hypervisor behind this agent cannot do what was asked."""

    def __init__(self, operation: str, detail: str) -> None:
        super().__init__(f"{operation} is not supported here: {detail}")
        self.operation = operation
        self.detail = detail


class NoMigrationJob(AgentError):
    def __init__(self, domain_uuid: str) -> None:
        super().__init__(f"no migration job runs on domain {domain_uuid}")
        self.domain_uuid = domain_uuid


class OperationRefused(AgentError):
    """The request is valid but impossible in the domain's current state."""

    def __init__(self, domain_uuid: str, operation: str, reason: str) -> None:
        super().__init__(f"{operation} on {domain_uuid} refused: {reason}")
        self.domain_uuid = domain_uuid
        self.operation = operation
        self.reason = reason


class MigrationBusy(AgentError):
    def __init__(self, domain_uuid: str) -> None:
        super().__init__(f"a migration of {domain_uuid} is already running")
        self.domain_uuid = domain_uuid


class HypervisorError(AgentError):
    """libvirt refused or failed an operation for a reason not mapped above."""

    def __init__(self, operation: str, code: int, detail: str) -> None:
        super().__init__(f"{operation} failed (libvirt error {code}): {detail}")
        self.operation = operation
        self.code = code
        self.detail = detail
