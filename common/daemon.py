"""What both daemons share: systemd notification, the gRPC server and channel set-up."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from oslo_config import cfg

from hostmaint.common import authz
from hostmaint.common.errors import MissingExtra

LOG = logging.getLogger(__name__)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def sd_notify(state: str) -> bool:
    """Sends a state (READY=1, STOPPING=1, STATUS=...) to systemd; False without systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:  # the manager went away: a notification is never worth a crash
        LOG.warning("systemd notification failed socket=%s error=%s", address, e)
        return False
    return True


class TlsConfigError(Exception):
    """TLS is half configured, or a configured file cannot be read."""

    def __init__(self, what: str, problem: str) -> None:
        super().__init__(f"TLS {what}: {problem}")
        self.what = what
        self.problem = problem


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str
    key_file: str
    ca_file: str

    @property
    def configured(self) -> bool:
        return bool(self.cert_file and self.key_file and self.ca_file)

    def check(self, what: str) -> None:
        """Raises TlsConfigError when some but not all files are set, or one is unreadable.

        A half-configured TLS must never fall back to plaintext silently.
        """
        names = {"cert_file": self.cert_file, "key_file": self.key_file, "ca_file": self.ca_file}
        if not any(names.values()):
            return
        missing = sorted(k for k, v in names.items() if not v)
        if missing:
            raise TlsConfigError(what, f"needs cert_file, key_file and ca_file; {missing} unset")
        for key, path in names.items():
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError as e:
                raise TlsConfigError(what, f"{key} {path}: {e.strerror}") from e

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: a client without a certificate signed by the CA is refused."""
        return grpc.ssl_server_credentials(
            [(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
            root_certificates=Path(self.ca_file).read_bytes(),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes(),
            private_key=Path(self.key_file).read_bytes(),
            certificate_chain=Path(self.cert_file).read_bytes(),
        )


class InsecureRefused(Exception):
    def __init__(self, listen: str, option: str = "[grpc] insecure") -> None:
        super().__init__(
            f"refusing plaintext gRPC on {listen}: configure TLS, use loopback, "
            f"or set {option} = true"
        )
        self.listen = listen
        self.option = option


def listen_host(listen: str) -> str:
    return listen.rsplit(":", 1)[0]


def is_loopback_address(address: str) -> bool:
    """True when host:port names this machine's loopback (or a unix socket)."""
    if address.startswith("unix:"):
        return True
    return listen_host(address) in LOOPBACK_HOSTS


def check_plaintext_target(address: str, tls: TlsFiles | None, insecure: bool, option: str) -> None:
    """A client's rule: plaintext to another machine only when `insecure` says so."""
    if tls is not None and tls.configured:
        return
    if is_loopback_address(address):
        return
    if not insecure:
        raise InsecureRefused(address, option)
    LOG.warning(
        "INSECURE: plaintext gRPC to %s, no authentication or encryption (%s = true)",
        address,
        option,
    )


def peer_of(context: grpc.ServicerContext) -> authz.Peer:
    """The caller as the authorisation decision sees it: transport, identities, address."""
    auth = context.auth_context()
    secure = b"ssl" in auth.get("transport_security_type", [])
    identities: set[str] = set()
    if secure:
        for key in ("x509_common_name", "peer_dns"):
            identities.update(v.decode("utf-8", "replace") for v in auth.get(key, []))
    return authz.Peer(
        authz.Transport.TLS if secure else authz.Transport.PLAINTEXT,
        frozenset(identities),
        context.peer() or "",
    )


def rewrapped(
    handler: grpc.RpcMethodHandler,
    *,
    unary_unary: Callable[[Any, grpc.ServicerContext], Any] | None = None,
    unary_stream: Callable[[Any, grpc.ServicerContext], Iterator[Any]] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour replaced by an interceptor's, its (de)serializers kept."""
    if unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_stream_rpc_method_handler(
        unary_stream,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class Authorizer(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuses protected methods with PERMISSION_DENIED unless `authz.decide` allows them."""

    def __init__(self, policy: authz.Policy) -> None:
        self._policy = policy

    def _check(self, method: str, context: grpc.ServicerContext) -> None:
        peer = peer_of(context)
        decision = authz.decide(self._policy, peer, method)
        if decision.allowed:
            return
        LOG.warning(
            "denied method=%s peer=%s identities=%s reason=%s",
            method,
            peer.address,
            ",".join(sorted(peer.identities)) or "-",
            decision.reason,
        )
        context.abort(grpc.StatusCode.PERMISSION_DENIED, decision.reason)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method not in self._policy.protected_methods:
            return handler
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                self._check(method, context)
                return inner_uu(request, context)

            return rewrapped(handler, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self._check(method, context)
                yield from inner_us(request, context)

            return rewrapped(handler, unary_stream=unary_stream)
        # Client-streaming methods: none are protected today; refuse rather than pass.
        raise TypeError(f"cannot protect streaming-request method {method}")


@dataclass
class Server:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    services: tuple[str, ...]

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services):
            self.health.set(name, status)

    def stop(self, grace_s: float) -> None:
        self.set_serving(False)
        self.server.stop(grace_s).wait()


def build_server(
    listen: str,
    register: Callable[[grpc.Server], None],
    service_names: Sequence[str],
    *,
    tls: TlsFiles,
    insecure: bool,
    max_workers: int = 32,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> Server:
    """A gRPC server with our services, health and reflection, bound to `listen`.

    With TLS configured every client must present a certificate the CA signed.
    Plaintext is refused off loopback unless `insecure` says so.
    """
    tls.check("[grpc]")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=list(interceptors),
        options=[("grpc.so_reuseport", 0)],
    )
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if tls.configured:
        port = server.add_secure_port(listen, tls.server_credentials())
        LOG.info("serving mutual TLS listen=%s ca=%s", listen, tls.ca_file)
    else:
        loopback = is_loopback_address(listen)
        if not loopback and not insecure:
            raise InsecureRefused(listen)
        if loopback:
            LOG.warning("serving plaintext gRPC on loopback listen=%s (no TLS configured)", listen)
        else:
            LOG.warning(
                "INSECURE: serving plaintext gRPC off loopback listen=%s: no authentication, "
                "no encryption; anyone who reaches the port is trusted ([grpc] insecure = true)",
                listen,
            )
        port = server.add_insecure_port(listen)
    result = Server(server, health_servicer, port, tuple(service_names))
    result.set_serving(False)
    return result


def channel(address: str, tls: TlsFiles | None = None) -> grpc.Channel:
    if tls is not None and tls.configured:
        return grpc.secure_channel(address, tls.channel_credentials())
    return grpc.insecure_channel(address)


class Daemon(Protocol):
    stopped: threading.Event
    exit_code: int  # what `serve` returns once stopped: non-zero asks systemd for a restart

    def start(self) -> None: ...

    def stop(self) -> None: ...


def load_config(
    argv: Sequence[str], prog: str, register: Callable[[cfg.ConfigOpts], None]
) -> cfg.ConfigOpts:
    """A private ConfigOpts with the daemon's options, read from --config-file."""
    conf = cfg.ConfigOpts()
    register(conf)
    conf(list(argv), project="hostmaint", prog=prog, default_config_files=[])
    return conf


def serve(build: Callable[[], Daemon], prog: str) -> int:
    """Builds the daemon, serves until SIGTERM or SIGINT, then stops it cleanly."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"
    )
    try:
        d = build()
    except (InsecureRefused, TlsConfigError, MissingExtra) as e:
        LOG.error("%s", e)
        return 2
    d.start()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        LOG.info("stopping on signal %d", signum)
        d.stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    LOG.info("%s serving", prog)
    d.stopped.wait()
    d.stop()
    return d.exit_code
