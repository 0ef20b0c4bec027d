"""A stand-in coordinator on a real gRPC server: canned answers, every call recorded."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import message

from hostmaint.protos import coordinator_pb2 as pb
from hostmaint.protos import coordinator_pb2_grpc
from tests.cli import samples

WAIT_S = 10.0


@dataclass
class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Answers like a coordinator would; `errors` makes a method fail with a status."""

    calls: list[tuple[str, message.Message]] = field(default_factory=list)
    errors: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    events: list[pb.DrainEvent] = field(default_factory=samples.events)
    # After the events: fail the stream with this status, or hold it open until the client goes.
    stream_error: tuple[grpc.StatusCode, str] | None = None
    hold_stream: bool = False
    holding: threading.Event = field(default_factory=threading.Event)
    client_gone: threading.Event = field(default_factory=threading.Event)
    status: pb.DrainStatus = field(default_factory=samples.running_status)
    undrain_enabled: bool = True

    def _enter(self, name: str, request: message.Message, context: grpc.ServicerContext) -> None:
        self.calls.append((name, request))
        if name in self.errors:
            code, details = self.errors[name]
            context.abort(code, details)

    def called(self, name: str) -> list[message.Message]:
        return [request for method, request in self.calls if method == name]

    def PlanDrain(
        self, request: pb.PlanDrainRequest, context: grpc.ServicerContext
    ) -> pb.DrainPlan:
        self._enter("PlanDrain", request, context)
        return samples.plan()

    def Drain(
        self, request: pb.DrainRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DrainEvent]:
        self._enter("Drain", request, context)
        context.add_callback(self.client_gone.set)
        yield from self.events
        if self.stream_error is not None:
            context.abort(*self.stream_error)
        if self.hold_stream:
            self.holding.set()
            self.client_gone.wait(WAIT_S)

    def GetDrain(
        self, request: pb.GetDrainRequest, context: grpc.ServicerContext
    ) -> pb.DrainStatus:
        self._enter("GetDrain", request, context)
        return self.status

    def CancelDrain(
        self, request: pb.CancelDrainRequest, context: grpc.ServicerContext
    ) -> pb.DrainStatus:
        self._enter("CancelDrain", request, context)
        status = pb.DrainStatus()
        status.CopyFrom(self.status)
        status.state = pb.DRAIN_STATE_CANCELLING
        return status

    def Undrain(
        self, request: pb.UndrainRequest, context: grpc.ServicerContext
    ) -> pb.UndrainResponse:
        self._enter("Undrain", request, context)
        return pb.UndrainResponse(host=request.host, enabled=self.undrain_enabled)

    def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.ServicerContext
    ) -> pb.ListAgentsResponse:
        self._enter("ListAgents", request, context)
        return samples.agents()


@dataclass
class Served:
    fake: FakeCoordinator
    address: str


@pytest.fixture
def served() -> Iterator[Served]:
    fake = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="fakecoord"))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Served(fake, f"127.0.0.1:{port}")
    finally:
        fake.client_gone.set()
        server.stop(0).wait()
