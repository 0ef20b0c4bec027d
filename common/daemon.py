"""What both daemons share: systemd notification, the gRPC server and channel set-up."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from oslo_config import cfg

LOG = logging.getLogger(__name__)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def sd_notify(state: str) -> bool:
    """Sends a state (READY=1, STOPPING=1, STATUS=...) to systemd; False without systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str
    key_file: str
    ca_file: str

    @property
    def configured(self) -> bool:
        return bool(self.cert_file and self.key_file and self.ca_file)

    def server_credentials(self) -> grpc.ServerCredentials:
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
    def __init__(self, listen: str) -> None:
        super().__init__(
            f"refusing plaintext gRPC on {listen}: configure TLS, listen on loopback, "
            "or set [grpc] insecure = true"
        )
        self.listen = listen


def listen_host(listen: str) -> str:
    return listen.rsplit(":", 1)[0]


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
) -> Server:
    """A gRPC server with our services, health and reflection, bound to `listen`.

    Plaintext is refused off loopback unless `insecure` says so.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[("grpc.so_reuseport", 0)],
    )
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if tls.configured:
        port = server.add_secure_port(listen, tls.server_credentials())
    else:
        if listen_host(listen) not in LOOPBACK_HOSTS and not insecure:
            raise InsecureRefused(listen)
        if listen_host(listen) not in LOOPBACK_HOSTS:
            LOG.warning("serving plaintext gRPC off loopback listen=%s (insecure)", listen)
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
    except InsecureRefused as e:
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
    return 0
