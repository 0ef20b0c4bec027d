"""The coordinator's errors; the servicer maps each to one gRPC status code."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base of every error the coordinator reports to its callers."""


class InvalidArgument(CoordinatorError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class UnknownHost(CoordinatorError):
    def __init__(self, host: str) -> None:
        super().__init__(f"unknown compute host {host!r}")
        self.host = host


class DrainNotFound(CoordinatorError):
    def __init__(self, what: str) -> None:
        super().__init__(f"no drain {what}")
        self.what = what


class RollNotFound(CoordinatorError):
    def __init__(self, what: str) -> None:
        super().__init__(f"no roll {what}")
        self.what = what


class DrainConflict(CoordinatorError):
    """A drain of this host runs already (the second caller is ABORTED)."""

    def __init__(self, host: str, drain_id: str) -> None:
        super().__init__(f"host {host} is being drained already (drain {drain_id})")
        self.host = host
        self.drain_id = drain_id


class PreconditionFailed(CoordinatorError):
    """The request is valid but the world is not ready for it (agent down, host busy)."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


class AgentUnavailable(CoordinatorError):
    def __init__(self, host: str, address: str, detail: str) -> None:
        super().__init__(f"agent of {host} at {address} is unavailable: {detail}")
        self.host = host
        self.address = address
        self.detail = detail


class AgentRefused(CoordinatorError):
    """The agent answered with an error status (not a transport failure)."""

    def __init__(self, host: str, operation: str, code: str, detail: str) -> None:
        super().__init__(f"agent of {host} refused {operation}: {code}: {detail}")
        self.host = host
        self.operation = operation
        self.code = code
        self.detail = detail


class CloudUnavailable(CoordinatorError):
    def __init__(self, detail: str) -> None:
        super().__init__(f"the cloud API is unavailable: {detail}")
        self.detail = detail


class NotLeader(CoordinatorError):
    """Another coordinator leads: this one answers reads only (callers retry elsewhere)."""

    def __init__(self, member_id: str) -> None:
        super().__init__(f"coordinator {member_id} is a standby, not the leader")
        self.member_id = member_id
