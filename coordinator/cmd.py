"""hostmaint-coordinator: the composition root of the central coordinator."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from oslo_config import cfg

from hostmaint.common import daemon, extras
from hostmaint.coordinator import config, ha
from hostmaint.coordinator.agents import AgentRegistry, CallFailed, ignore_call_failure
from hostmaint.coordinator.drivers import nova
from hostmaint.coordinator.drivers.base import MigrationDriver
from hostmaint.coordinator.drivers.direct import DirectDriver
from hostmaint.coordinator.executor import Executor, ExecutorSettings
from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.coordinator.model import DrainPolicy
from hostmaint.coordinator.rollrun import Rolls, RollSettings
from hostmaint.coordinator.servicer import CoordinatorServicer
from hostmaint.protos import coordinator_pb2_grpc

if TYPE_CHECKING:
    from hostmaint.coordinator.metrics import CoordinatorMetrics

LOG = logging.getLogger(__name__)
SERVICE_NAME = "hostmaint.v1.Coordinator"
EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: systemd's Restart=on-failure brings it back as a standby
# Nova's test fixture stubs Keystone and trusts these headers.
NOAUTH_HEADERS = {
    "X-Auth-User": "admin",
    "X-Auth-Project-Id": "admin",
    "X-Roles": "admin,member,reader",
}


def _nova_driver(conf: cfg.ConfigOpts, stopped: threading.Event) -> MigrationDriver:
    n = conf.nova
    if n.endpoint:
        headers = NOAUTH_HEADERS if n.noauth else {}
        conn = nova.connect(endpoint=n.endpoint, headers=headers, timeout_s=n.timeout_s)
    elif n.cloud:
        conn = nova.connect(cloud=n.cloud, timeout_s=n.timeout_s)
    else:
        raise SystemExit("[nova] needs `cloud` (clouds.yaml) or `endpoint`")
    return nova.NovaDriver(
        conn,
        microversion=n.microversion,
        timeout_s=n.timeout_s,
        get_retries=n.retries,
        wait=stopped.wait,
    )


class Coordinator:
    """The assembled daemon: journal, agents, driver, executor, gRPC server."""

    def __init__(self, conf: cfg.ConfigOpts, stopped: threading.Event | None = None) -> None:
        self.conf = conf
        self.stopped = stopped or threading.Event()
        self.exit_code = 0
        # First the options whose backends may be missing (MissingExtra): nothing
        # is created or connected before them.
        self.metrics: CoordinatorMetrics | None = None
        on_call_failed: CallFailed = ignore_call_failure
        if conf.metrics.listen:
            extras.require(extras.METRICS, extras.METRICS_OPTION, ["prometheus_client"])
            from hostmaint.coordinator.metrics import CoordinatorMetrics

            self.metrics = CoordinatorMetrics()
            on_call_failed = self.metrics.agent_call_failed
        c = conf.coordination
        self.coordination = ha.from_config(
            c.backend_url,
            c.group,
            c.member_id,
            c.lease_ttl_s,
            c.heartbeat_interval_s,
            on_elected=self._elected,
            on_lost=self._lost,
        )
        url = conf.database.url
        engine = make_engine(url)
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(engine, clock=time.time, upgrade=conf.database.auto_upgrade)
        tls = daemon.TlsFiles(conf.agents.cert_file, conf.agents.key_file, conf.agents.ca_file)
        tls.check("[agents]")
        self.driver: MigrationDriver
        if conf.driver.name == "libvirt":
            self.registry = AgentRegistry(
                conf.agents.hosts,
                timeout_s=conf.agents.timeout_s,
                tls=tls,
                clock=time.time,
                insecure=conf.agents.insecure,
                on_call_failed=on_call_failed,
            )
            self.driver = DirectDriver(
                self.registry,
                self.journal,
                conf.libvirt_driver.uris,
                clock=time.time,
                cpu_allocation_ratio=conf.libvirt_driver.cpu_allocation_ratio,
            )
        else:
            cloud = _nova_driver(conf, self.stopped)
            port = conf.agents.port

            def discover() -> dict[str, str]:
                return {h.name: f"{h.name}:{port}" for h in cloud.list_hosts()}

            self.registry = AgentRegistry(
                conf.agents.hosts,
                timeout_s=conf.agents.timeout_s,
                tls=tls,
                clock=time.time,
                discover=discover,
                insecure=conf.agents.insecure,
                on_call_failed=on_call_failed,
            )
            self.driver = cloud
        d = conf.drain
        self.executor = Executor(
            self.driver,
            self.registry,
            self.journal,
            ExecutorSettings(
                defaults=DrainPolicy(
                    max_downtime_ms=float(d.max_downtime_ms),
                    max_parallel_per_source=d.max_parallel_per_source,
                    max_parallel_per_target=d.max_parallel_per_target,
                    postcopy_avoidance_stretch=d.postcopy_avoidance_stretch,
                ),
                link_bandwidth_bytes_per_s=d.link_bandwidth_bytes_per_s,
                poll_interval_s=d.poll_interval_s,
                stall_factor=d.stall_factor,
                stall_grace_s=d.stall_grace_s,
                max_attempts=d.max_attempts,
                dirty_rate_window_s=d.dirty_rate_window_s,
                dirty_rate_max_window_s=d.dirty_rate_max_window_s,
                dirty_rate_max_age_s=d.dirty_rate_max_age_s,
                migration_addresses=dict(conf.libvirt_driver.migration_addresses),
                watch_start_timeout_s=d.watch_start_timeout_s,
                escalation_settle_s=d.escalation_settle_s,
                postcopy_resume_first_s=d.postcopy_resume_first_s,
                postcopy_resume_max_s=d.postcopy_resume_max_s,
                postcopy_recovery_deadline_s=d.postcopy_recovery_deadline_s,
            ),
            clock=time.time,
            stopped=self.stopped,
            coordination=self.coordination,
        )
        r = conf.roll
        self.rolls = Rolls(
            self.executor,
            RollSettings(
                hook_dir=r.hook_dir,
                hook_timeout_s=r.hook_timeout_s,
                back_timeout_s=r.back_timeout_s,
                maintenance_s=r.maintenance_s,
                cpu_allocation_ratio=r.cpu_allocation_ratio,
                poll_interval_s=d.poll_interval_s,
            ),
            clock=time.time,
            stopped=self.stopped,
        )
        servicer = CoordinatorServicer(self.executor, self.registry, self.rolls)
        self.server = daemon.build_server(
            conf.grpc.listen,
            lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s),
            [SERVICE_NAME],
            tls=daemon.TlsFiles(conf.grpc.cert_file, conf.grpc.key_file, conf.grpc.ca_file),
            insecure=conf.grpc.insecure,
            interceptors=[self.metrics.rpcs] if self.metrics is not None else [],
        )

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.server.server.start()
        if self.metrics is not None:
            self.metrics.start(
                self.conf.metrics.listen,
                self.executor,
                self.journal,
                self.registry,
                clock=time.time,
                stopped=self.stopped,
                interval_s=self.conf.drain.poll_interval_s,
            )
        # Elected at once when alone; otherwise a standby until the leader's lease lapses.
        self.coordination.start()
        if not self.coordination.is_leader():
            LOG.info("standby member=%s: drains start on the leader", self.coordination.member_id)
            daemon.sd_notify(f"READY=1\nSTATUS=standby on port {self.port}")

    def _elected(self) -> None:
        """Leader now: take over the drains the previous leader left, then serve."""
        LOG.info("leader member=%s", self.coordination.member_id)
        resumed = self.executor.resume_all()
        if resumed:
            LOG.info("resumed drains=%s", ",".join(resumed))
        rolls = self.rolls.resume_all()  # after their drains
        if rolls:
            LOG.info("resumed rolls=%s", ",".join(rolls))
        self.server.set_serving(True)
        daemon.sd_notify(f"READY=1\nSTATUS=serving on port {self.port}")
        if self.executor.left_to_holders():
            threading.Thread(target=self._resume_left, name="resume-left", daemon=True).start()

    def _resume_left(self) -> None:
        """Retries the drains whose host lock a dead leader still held at the election.

        Its leases lapse at about the same time, but each in its own etcd lease:
        the leadership may be free a moment before the host locks are.
        """
        interval_s = self.conf.coordination.heartbeat_interval_s
        while not self.stopped.wait(interval_s) and self.coordination.is_leader():
            resumed = self.executor.resume_all()
            if resumed:
                LOG.info("resumed drains=%s", ",".join(resumed))
            if not self.executor.left_to_holders():
                return

    def _lost(self, what: str) -> None:
        """A lease lapsed: another coordinator may act now, so this one must stop at once."""
        LOG.critical("lost %s: stopping so another coordinator can take over", what)
        self.exit_code = EXIT_LEASE_LOST
        self.stopped.set()  # drain threads end without finishing their drains in the journal

    def stop(self) -> None:
        daemon.sd_notify("STOPPING=1")
        self.stopped.set()
        self.server.stop(self.conf.grpc.grace_s)
        if self.metrics is not None:
            self.metrics.stop()
        self.coordination.stop()
        self.registry.close()


def load_config(argv: Sequence[str]) -> cfg.ConfigOpts:
    return daemon.load_config(argv, "hostmaint-coordinator", config.register_opts)


def main(argv: Sequence[str] | None = None) -> int:
    conf = load_config(sys.argv[1:] if argv is None else argv)
    return daemon.serve(lambda: Coordinator(conf), "hostmaint-coordinator")


if __name__ == "__main__":
    sys.exit(main())
