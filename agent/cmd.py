"""hostmaint-agent: the composition root of the per-host agent daemon."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
from oslo_config import cfg

from hostmaint.agent import config, errors
from hostmaint.agent.dirtyrate import DirtyRateMeter, Schedule
from hostmaint.agent.hoststats import shared_path_checker
from hostmaint.agent.libvirt_driver import LibvirtDriver, start_event_loop
from hostmaint.agent.migrations import MigrationTracker
from hostmaint.agent.service import AgentService
from hostmaint.agent.servicer import MUTATING_METHODS, HostAgentServicer
from hostmaint.agent.servicer import SERVICE_NAME as SERVICE_NAME
from hostmaint.agent.stale import IncomingSweeper, StaleIncoming
from hostmaint.agent.types import DirtyRateMethod
from hostmaint.common import authz, daemon, extras
from hostmaint.protos import agent_pb2_grpc

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from hostmaint.common.metrics import Endpoint

LOG = logging.getLogger(__name__)
_RECONNECT_S = 2.0


def _log_policy(conf: cfg.ConfigOpts, tls: daemon.TlsFiles, policy: authz.Policy) -> None:
    """States at start who may change domains and where they may go."""
    if tls.configured:
        if policy.allowed_identities:
            LOG.info(
                "Migrate and TuneMigration allowed to identities=%s",
                ",".join(sorted(policy.allowed_identities)),
            )
        else:
            LOG.warning(
                "no [grpc] allowed_coordinators: Migrate and TuneMigration are refused to "
                "every client"
            )
    else:
        LOG.warning(
            "no TLS: Migrate and TuneMigration over plaintext plaintext_mutations=%s",
            policy.plaintext,
        )
    if not conf.migration.allowed_destinations:
        LOG.warning("no [migration] allowed_destinations: every migration is refused")


class Agent:
    """The assembled daemon: libvirt connection, measurements, jobs, gRPC server."""

    def __init__(self, conf: cfg.ConfigOpts, stopped: threading.Event | None = None) -> None:
        self.conf = conf
        self.stopped = stopped or threading.Event()
        self.exit_code = 0
        if conf.metrics.listen:  # before anything is opened: MissingExtra without the extra
            extras.require(extras.METRICS, extras.METRICS_OPTION, ["prometheus_client"])
        start_event_loop()
        self.driver = LibvirtDriver(
            conf.libvirt.uri,
            is_shared_path=shared_path_checker(conf.libvirt.shared_storage_paths),
            clock=time.time,
        )
        self.meter = DirtyRateMeter(self.driver, wait=self.stopped.wait, clock=time.monotonic)
        self.tracker = MigrationTracker(self.driver, clock=time.monotonic, wait=self.stopped.wait)
        self.sweeper = IncomingSweeper(
            self.driver,
            StaleIncoming(conf.migration.stale_incoming_grace_s),
            clock=time.monotonic,
            wait=self.stopped.wait,
        )
        self.service = AgentService(
            self.driver,
            self.meter,
            self.tracker,
            default_window_s=conf.dirty_rate.window_s,
            default_watch_interval_s=conf.migration.watch_interval_s,
            migration_interface=conf.migration.interface,
            allowed_destinations=conf.migration.allowed_destinations,
            allowed_migration_hosts=conf.migration.allowed_migration_hosts,
        )
        servicer = HostAgentServicer(self.service, clock=time.time)
        tls = daemon.TlsFiles(conf.grpc.cert_file, conf.grpc.key_file, conf.grpc.ca_file)
        policy = authz.Policy.of(
            MUTATING_METHODS,
            conf.grpc.allowed_coordinators,
            authz.PlaintextPolicy(conf.grpc.plaintext_mutations),
        )
        _log_policy(conf, tls, policy)
        interceptors: list[grpc.ServerInterceptor] = [daemon.Authorizer(policy)]
        self._metrics_registry: CollectorRegistry | None = None
        self.metrics: Endpoint | None = None
        if conf.metrics.listen:
            from hostmaint.agent import metrics

            self._metrics_registry, counter = metrics.registry_for(self.service)
            interceptors.insert(0, counter)  # outermost: refused calls count too
        self.server = daemon.build_server(
            conf.grpc.listen,
            lambda s: agent_pb2_grpc.add_HostAgentServicer_to_server(servicer, s),
            [SERVICE_NAME],
            tls=tls,
            insecure=conf.grpc.insecure,
            max_workers=conf.grpc.max_workers,
            interceptors=interceptors,
        )
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.server.server.start()
        if self._metrics_registry is not None:
            from hostmaint.common import metrics

            self.metrics = metrics.serve(self.conf.metrics.listen, self._metrics_registry)
        self._threads.append(
            threading.Thread(target=self._keep_connected, name="libvirt-connect", daemon=True)
        )
        if self.conf.dirty_rate.enabled:
            method = self.conf.dirty_rate.method
            schedule = Schedule(
                interval_s=self.conf.dirty_rate.interval_s,
                window_s=self.conf.dirty_rate.window_s,
                max_window_s=self.conf.dirty_rate.max_window_s,
                batch_size=self.conf.dirty_rate.batch_size,
                method=None if method == "auto" else DirtyRateMethod(method),
            )
            self._threads.append(
                threading.Thread(
                    target=self.meter.run_schedule,
                    args=(schedule, self.stopped),
                    name="dirty-rate",
                    daemon=True,
                )
            )
        if self.conf.migration.stale_incoming_grace_s > 0:
            self._threads.append(
                threading.Thread(
                    target=self.sweeper.run,
                    args=(self.stopped.is_set,),
                    name="stale-incoming",
                    daemon=True,
                )
            )
        for t in self._threads:
            t.start()

    def _keep_connected(self) -> None:
        """Health follows libvirt: SERVING while connected, re-opening after a restart."""
        ready_sent = False
        while not self.stopped.is_set():
            try:
                if not self.driver.connected:
                    self.driver.close()
                    self.driver.connect()
                self.server.set_serving(True)
                if not ready_sent:
                    daemon.sd_notify(f"READY=1\nSTATUS=serving on port {self.port}")
                    ready_sent = True
            except errors.HypervisorUnavailable as e:
                LOG.warning("libvirt unavailable, retrying uri=%s error=%s", self.driver.uri, e)
                self.server.set_serving(False)
            self.stopped.wait(_RECONNECT_S)

    def stop(self) -> None:
        daemon.sd_notify("STOPPING=1")
        self.stopped.set()
        self.server.stop(self.conf.grpc.grace_s)
        if self.metrics is not None:
            self.metrics.stop()
        self.driver.close()


def load_config(argv: Sequence[str]) -> cfg.ConfigOpts:
    return daemon.load_config(argv, "hostmaint-agent", config.register_opts)


def main(argv: Sequence[str] | None = None) -> int:
    conf = load_config(sys.argv[1:] if argv is None else argv)
    return daemon.serve(lambda: Agent(conf), "hostmaint-agent")


if __name__ == "__main__":
    sys.exit(main())
