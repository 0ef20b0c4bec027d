"""Prometheus metrics plumbing both daemons share: the HTTP endpoint and the gRPC call counter.

Each daemon keeps its metrics in a private `CollectorRegistry` built in its
composition root, never in prometheus_client's global one. This module, like
the daemons' own metrics modules, needs the `metrics` extra (prometheus-client)
and is imported only where `[metrics] listen` is set (common/extras.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, start_http_server

from hostmaint.common import daemon

LOG = logging.getLogger(__name__)


@dataclass
class Endpoint:
    """The HTTP server answering GET /metrics."""

    server: WSGIServer
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(listen: str, registry: CollectorRegistry) -> Endpoint:
    """Serves `registry` over plain HTTP on `listen` (host:port; port 0 picks one)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    server, _thread = start_http_server(int(port), addr=host, registry=registry)
    bound = int(server.server_port)
    if daemon.is_loopback_address(listen):
        LOG.info("serving metrics listen=%s port=%d", listen, bound)
    else:
        LOG.warning(
            "serving metrics over plain HTTP off loopback listen=%s port=%d: anyone who "
            "reaches the port reads the VMs' UUIDs and the drains' progress",
            listen,
            bound,
        )
    return Endpoint(server, bound)


def rpc_counter(registry: CollectorRegistry, prefix: str) -> Counter:
    """`<prefix>_rpcs_total{method, code}`: the served calls by method and final status."""
    return Counter(
        f"{prefix}_rpcs",
        "gRPC calls served, by method and the status code they ended with (OK or an error).",
        ["method", "code"],
        registry=registry,
    )


class RpcCounter(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts every served call of a registered method by its final status code.

    The method names are those the server registers (a bounded set); calls to
    unknown methods are not counted.
    """

    def __init__(self, counter: Counter) -> None:
        self._counter = counter

    def _count(
        self,
        method: str,
        context: grpc.ServicerContext,
        failed: bool,
        otherwise: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
    ) -> None:
        code = context.code()
        if code is None:
            code = otherwise if failed else grpc.StatusCode.OK
        self._counter.labels(method.rsplit("/", 1)[-1], code.name).inc()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    answer = inner_uu(request, context)
                except BaseException:
                    self._count(method, context, failed=True)
                    raise
                self._count(method, context, failed=False)
                return answer

            return daemon.rewrapped(handler, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from inner_us(request, context)
                except GeneratorExit:  # the client went away mid-stream
                    self._count(method, context, True, grpc.StatusCode.CANCELLED)
                    raise
                except BaseException:
                    self._count(method, context, failed=True)
                    raise
                self._count(method, context, failed=False)

            return daemon.rewrapped(handler, unary_stream=unary_stream)
        return handler  # client-streaming methods: none of ours
