"""gRPC Coordinator: proto in, executor call, proto out, and one error table."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from hostmaint.coordinator import errors, views
from hostmaint.coordinator.agents import AgentRegistry
from hostmaint.coordinator.executor import Executor
from hostmaint.coordinator.rollrun import Rolls
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc

LOG = logging.getLogger(__name__)
T = TypeVar("T")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
MAX_REASON = 255
MAX_POLICY_VMS = 10_000
MAX_DRAIN_ID = 64
MAX_TARGET_HOSTS = 1_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

STATUS_CODES: dict[type[errors.CoordinatorError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownHost: grpc.StatusCode.NOT_FOUND,
    errors.DrainNotFound: grpc.StatusCode.NOT_FOUND,
    errors.RollNotFound: grpc.StatusCode.NOT_FOUND,
    errors.DrainConflict: grpc.StatusCode.ABORTED,
    errors.PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AgentUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.NotLeader: grpc.StatusCode.UNAVAILABLE,
    errors.AgentRefused: grpc.StatusCode.FAILED_PRECONDITION,
    errors.CloudUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def _abort(context: grpc.ServicerContext, error: errors.CoordinatorError) -> NoReturn:
    context.abort(STATUS_CODES.get(type(error), grpc.StatusCode.INTERNAL), str(error))
    raise AssertionError("context.abort returns only by raising")


def translated(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return method(self, request, context)
        except errors.CoordinatorError as e:
            _abort(context, e)

    return wrapper


def check_host(host: str, known: list[str] | None = None) -> str:
    if not host:
        raise errors.InvalidArgument("host", "is required")
    if not _HOST.match(host):
        raise errors.InvalidArgument("host", f"{host[:64]!r} is not a host name")
    if known is not None and host not in known:
        raise errors.UnknownHost(host)
    return host


def check_drain_id(drain_id: str) -> str:
    """Drain ids are UUIDs: an over-long or garbled one is invalid, any other non-UUID unknown."""
    if len(drain_id) > MAX_DRAIN_ID or _CONTROL.search(drain_id):
        raise errors.InvalidArgument("drain_id", f"{drain_id[:64]!r} is not a drain id (a UUID)")
    if not _UUID.match(drain_id):
        raise errors.DrainNotFound(repr(drain_id))
    return drain_id.lower()


def check_reason(reason: str) -> str:
    if len(reason) > MAX_REASON:
        raise errors.InvalidArgument("reason", f"at most {MAX_REASON} characters")
    if _CONTROL.search(reason):
        raise errors.InvalidArgument("reason", "must not contain control characters")
    return reason


def check_policy_fields(policy: cpb.DrainPolicy) -> None:
    """The policy's names and sizes; its numbers are checked by the executor's policy()."""
    if len(policy.vm_max_downtime_ms) > MAX_POLICY_VMS:
        raise errors.InvalidArgument("policy.vm_max_downtime_ms", f"at most {MAX_POLICY_VMS} VMs")
    for uuid in policy.vm_max_downtime_ms:
        if not _UUID.match(uuid):
            raise errors.InvalidArgument(
                "policy.vm_max_downtime_ms", f"{uuid[:64]!r} is not a UUID"
            )
    if len(policy.target_hosts) > MAX_TARGET_HOSTS:
        raise errors.InvalidArgument("policy.target_hosts", f"at most {MAX_TARGET_HOSTS} hosts")
    for host in policy.target_hosts:
        check_host(host)
    if len(policy.vm_target_hosts) > MAX_POLICY_VMS:
        raise errors.InvalidArgument("policy.vm_target_hosts", f"at most {MAX_POLICY_VMS} VMs")
    for uuid, host in policy.vm_target_hosts.items():
        if not _UUID.match(uuid):
            raise errors.InvalidArgument("policy.vm_target_hosts", f"{uuid[:64]!r} is not a UUID")
        check_host(host)


def check_roll_request(request: cpb.RollRequest) -> None:
    """The roll's names and sizes; the rest is checked by Rolls.check."""
    if len(request.hosts) > MAX_TARGET_HOSTS:
        raise errors.InvalidArgument("hosts", f"at most {MAX_TARGET_HOSTS} hosts")
    for host in request.hosts:
        check_host(host)
    if request.aggregate and (len(request.aggregate) > 255 or _CONTROL.search(request.aggregate)):
        raise errors.InvalidArgument("aggregate", "at most 255 characters, no control characters")
    if len(request.hook) > 1024 or _CONTROL.search(request.hook):
        raise errors.InvalidArgument("hook", "at most 1024 characters, no control characters")
    check_reason(request.reason)
    check_policy_fields(request.policy)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self, executor: Executor, registry: AgentRegistry, rolls: Rolls | None = None
    ) -> None:
        self._executor = executor
        self._registry = registry
        self._rolls = rolls

    def _roll_service(self) -> Rolls:
        if self._rolls is None:
            raise errors.PreconditionFailed("roll", "this coordinator runs no rolls")
        return self._rolls

    def _roll_id(self, roll_id: str) -> str:
        if not roll_id:
            return self._roll_service().latest()
        if len(roll_id) > MAX_DRAIN_ID or _CONTROL.search(roll_id):
            raise errors.InvalidArgument("roll_id", f"{roll_id[:64]!r} is not a roll id (a UUID)")
        if not _UUID.match(roll_id):
            raise errors.RollNotFound(repr(roll_id))
        return roll_id.lower()

    def _known_host(self, host: str) -> str:
        return check_host(host, self._registry.hosts())

    def _policy(self, policy: cpb.DrainPolicy) -> None:
        check_policy_fields(policy)
        self._executor.policy(policy)  # numbers and enums, before anything is read or changed

    def _drain_id(self, host: str, drain_id: str) -> str:
        if host:
            check_host(host)
        if drain_id:
            return check_drain_id(drain_id)
        self._known_host(host)
        latest = self._executor.journal.latest_drain(host)
        if latest is None:
            raise errors.DrainNotFound(f"of host {host}")
        return latest.id

    @translated
    def PlanDrain(
        self, request: cpb.PlanDrainRequest, context: grpc.ServicerContext
    ) -> cpb.DrainPlan:
        host = self._known_host(request.host)
        self._policy(request.policy)
        plan_pb, _, _ = self._executor.plan(host, request.policy)
        return plan_pb

    def Drain(
        self, request: cpb.DrainRequest, context: grpc.ServicerContext
    ) -> Iterator[cpb.DrainEvent]:
        try:
            host = self._known_host(request.host)
            self._policy(request.policy)
            check_reason(request.reason)
            finished = self._executor.finished_drain(host)
            if finished is not None:
                # Re-running a finished drain is a no-op: it is reported again.
                yield from self._executor.events(finished, lambda: not context.is_active())
                return
            drain_id = self._executor.start_drain(host, request.policy, request.reason)
        except errors.CoordinatorError as e:
            _abort(context, e)
        yield from self._executor.events(drain_id, lambda: not context.is_active())

    @translated
    def GetDrain(
        self, request: cpb.GetDrainRequest, context: grpc.ServicerContext
    ) -> cpb.DrainStatus:
        return self._executor.status(self._drain_id(request.host, request.drain_id))

    @translated
    def GetDrainHistory(
        self, request: cpb.GetDrainRequest, context: grpc.ServicerContext
    ) -> cpb.DrainHistory:
        drain_id = self._drain_id(request.host, request.drain_id)
        status = self._executor.status(drain_id)
        steps = [views.step_to_pb(s) for s in self._executor.journal.steps(drain_id)]
        # The events kept in memory, read once (a drain not run by this process has none
        # but a FINISHED made up for it); FINISHED repeats the status, and is left out.
        kept = list(self._executor.events(drain_id, lambda: True))
        ran_here = bool(kept) and kept[0].kind == cpb.DRAIN_EVENT_KIND_STARTED
        events = [e for e in kept if ran_here and e.kind != cpb.DRAIN_EVENT_KIND_FINISHED]
        return cpb.DrainHistory(status=status, steps=steps, events=events)

    @translated
    def CancelDrain(
        self, request: cpb.CancelDrainRequest, context: grpc.ServicerContext
    ) -> cpb.DrainStatus:
        drain_id = self._drain_id(request.host, request.drain_id)
        self._executor.cancel(drain_id, request.abort_running)
        return self._executor.status(drain_id)

    @translated
    def Undrain(
        self, request: cpb.UndrainRequest, context: grpc.ServicerContext
    ) -> cpb.UndrainResponse:
        host = self._known_host(request.host)
        self._executor.undrain(host)
        return cpb.UndrainResponse(host=host, enabled=True)

    @translated
    def ListAgents(
        self, request: cpb.ListAgentsRequest, context: grpc.ServicerContext
    ) -> cpb.ListAgentsResponse:
        answer = cpb.ListAgentsResponse()
        for status in self._registry.probe_all():
            info = cpb.AgentInfo(
                host=status.host,
                address=status.address,
                health=status.health,
                error=status.error,
                checked_at=views.timestamp(status.checked_at),
            )
            if status.report is not None:
                info.last_report.CopyFrom(status.report)
            answer.agents.append(info)
        return answer

    # -- rolls ------------------------------------------------------------------------

    @translated
    def PlanRoll(self, request: cpb.RollRequest, context: grpc.ServicerContext) -> cpb.RollPlan:
        check_roll_request(request)
        plan, _ = self._roll_service().plan(request)
        return plan

    def Roll(
        self, request: cpb.RollRequest, context: grpc.ServicerContext
    ) -> Iterator[cpb.RollEvent]:
        try:
            check_roll_request(request)
            rolls = self._roll_service()
            roll_id = rolls.open_roll_of(request) or rolls.start(request)
        except errors.CoordinatorError as e:
            _abort(context, e)
        yield from rolls.events(roll_id, lambda: not context.is_active())

    @translated
    def GetRoll(self, request: cpb.GetRollRequest, context: grpc.ServicerContext) -> cpb.RollStatus:
        return self._roll_service().status(self._roll_id(request.roll_id))

    @translated
    def CancelRoll(
        self, request: cpb.CancelRollRequest, context: grpc.ServicerContext
    ) -> cpb.RollStatus:
        roll_id = self._roll_id(request.roll_id)
        self._roll_service().cancel(roll_id, request.abort_running)
        return self._roll_service().status(roll_id)

    def ResumeRoll(
        self, request: cpb.ResumeRollRequest, context: grpc.ServicerContext
    ) -> Iterator[cpb.RollEvent]:
        try:
            roll_id = self._roll_id(request.roll_id)
            if request.skip_host:
                check_host(request.skip_host)
            rolls = self._roll_service()
            rolls.resume(roll_id, request.skip_host, request.hook_done)
        except errors.CoordinatorError as e:
            _abort(context, e)
        yield from rolls.events(roll_id, lambda: not context.is_active())
