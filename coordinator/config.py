"""The coordinator's options (oslo.config), registered on a private ConfigOpts."""

from __future__ import annotations

from oslo_config import cfg

from hostmaint.common.options import metrics_opts
from hostmaint.coordinator.limits import MAX_DOWNTIME_MS, MAX_PARALLEL, MAX_POSTCOPY_STRETCH
from hostmaint.coordinator.model import DrainPolicy

grpc_opts = [
    cfg.StrOpt("listen", default="0.0.0.0:7711", help="The host:port the gRPC server binds."),
    cfg.BoolOpt(
        "insecure",
        default=False,
        help="Serve plaintext gRPC on a non-loopback address. Only for labs: anyone who "
        "reaches the port can then start and cancel drains. Without TLS and without this "
        "the coordinator refuses to start on any address but loopback.",
    ),
    cfg.StrOpt(
        "cert_file",
        default="",
        help="The server certificate (PEM) for mutual TLS. With cert_file, key_file and "
        "ca_file set every client (the CLI) must present a certificate signed by ca_file.",
    ),
    cfg.StrOpt("key_file", default="", help="The server private key (PEM) for mutual TLS."),
    cfg.StrOpt("ca_file", default="", help="The CA (PEM) that signs the clients' certificates."),
    cfg.FloatOpt("grace_s", default=10.0, min=0, help="Seconds in-flight calls get on stop."),
]

database_opts = [
    cfg.StrOpt(
        "url",
        default="sqlite:////var/lib/hostmaint/coordinator.db",
        help="SQLAlchemy URL of the drain journal (SQLite by default; any SQLAlchemy "
        "database in production, e.g. postgresql+psycopg://...).",
        secret=True,
    ),
]

agents_opts = [
    cfg.DictOpt(
        "hosts",
        default={},
        help="Agents by compute host name: host1:10.0.0.1:7710,host2:10.0.0.2:7710. Hosts "
        "not listed are found from the cloud's hypervisor list plus `port`.",
    ),
    cfg.PortOpt("port", default=7710, help="The agents' port, for hosts found from the cloud."),
    cfg.FloatOpt("timeout_s", default=10.0, min=0.1, help="Deadline of each agent call."),
    cfg.FloatOpt(
        "health_interval_s", default=10.0, min=0.5, help="Seconds between two health probes."
    ),
    cfg.StrOpt(
        "cert_file",
        default="",
        help="Client certificate (PEM) for the agents. Its common name or a DNS subject "
        "alternative name must be in each agent's [grpc] allowed_coordinators for "
        "migrations and tuning.",
    ),
    cfg.StrOpt("key_file", default="", help="Client key (PEM) for the agents."),
    cfg.StrOpt("ca_file", default="", help="The CA (PEM) of the agents' certificates."),
    cfg.BoolOpt(
        "insecure",
        default=False,
        help="Talk plaintext gRPC to agents that are not on loopback. Only for labs: "
        "without TLS and without this the coordinator refuses to reach such agents.",
    ),
]

driver_opts = [
    cfg.StrOpt(
        "name",
        default="nova",
        choices=["nova", "libvirt"],
        help="How migrations are driven: nova (the Nova API; production) or libvirt (the "
        "source agent migrates peer to peer; for clouds without Nova and for the lab).",
    ),
]

libvirt_driver_opts = [
    cfg.DictOpt(
        "uris",
        default={},
        help="libvirt URI of each host for peer-to-peer migration, "
        "host1:qemu+tls://host1/system,...",
    ),
    cfg.FloatOpt(
        "cpu_allocation_ratio",
        default=16.0,
        min=1.0,
        help="vCPUs a host may run per physical CPU (Nova's default overcommit), for the "
        "capacity the libvirt driver plans with.",
    ),
    cfg.DictOpt(
        "migration_addresses",
        default={},
        help="Address the migration stream goes to, per target host (tcp://10.1.0.2). "
        "Default: libvirt picks the target's hostname.",
    ),
]

nova_opts = [
    cfg.StrOpt("cloud", default="", help="The clouds.yaml cloud to use for Nova."),
    cfg.StrOpt(
        "endpoint",
        default="",
        help="Nova's compute endpoint, overriding the service catalog (for tests and labs).",
    ),
    cfg.BoolOpt(
        "noauth",
        default=False,
        help="Send the admin headers of Nova's test fixture instead of authenticating. "
        "Only for test deployments.",
    ),
    cfg.StrOpt(
        "microversion",
        default="2.80",
        help="The compute API microversion to use; at least 2.30 so a chosen target is "
        "still checked by Nova's scheduler.",
    ),
    cfg.FloatOpt("timeout_s", default=30.0, min=1, help="Deadline of each Nova call."),
    cfg.IntOpt("retries", default=3, min=0, help="Retries of idempotent reads on 5xx/timeouts."),
]

drain_opts = [
    cfg.IntOpt(
        "max_downtime_ms",
        default=500,
        min=1,
        max=MAX_DOWNTIME_MS,
        help="Default real downtime an operator accepts per VM.",
    ),
    cfg.IntOpt("max_parallel_per_source", default=4, min=1, max=MAX_PARALLEL, help="Default cap."),
    cfg.IntOpt("max_parallel_per_target", default=2, min=1, max=MAX_PARALLEL, help="Default cap."),
    cfg.FloatOpt(
        "postcopy_avoidance_stretch",
        default=DrainPolicy.postcopy_avoidance_stretch,
        min=0.0,
        max=MAX_POSTCOPY_STRETCH,
        help="Where a drain allows post-copy: how much longer than the soonest plan (a "
        "fraction) the drain may take to move VMs from post-copy back to pre-copy (each "
        "post-copy is a VM lost if the network fails during it). 0: the soonest plan.",
    ),
    cfg.FloatOpt(
        "link_bandwidth_bytes_per_s",
        default=0,
        min=0,
        help="Migration link bandwidth; 0: the source agent's NIC speed.",
    ),
    cfg.FloatOpt(
        "poll_interval_s",
        default=1.0,
        min=0.05,
        help="Progress sampling interval of each migration, in the drain and in the plan's "
        "simulation of it (which samples as often: the shorter, the longer planning takes). "
        "The plan also simulates the escalation with stall_factor, stall_grace_s and "
        "escalation_settle_s.",
    ),
    cfg.FloatOpt(
        "stall_factor",
        default=1.5,
        min=1.0,
        help="A migration is behind when its elapsed time exceeds the prediction times this.",
    ),
    cfg.FloatOpt(
        "stall_grace_s",
        default=10.0,
        min=0,
        help="Seconds added to every prediction before a migration counts as behind.",
    ),
    cfg.FloatOpt(
        "escalation_settle_s",
        default=8.0,
        min=0,
        help="Seconds an escalation step (downtime raise, throttle) gets to show its effect "
        "before the next is taken.",
    ),
    cfg.FloatOpt(
        "watch_start_timeout_s",
        default=30.0,
        min=0.1,
        help="Seconds the source agent waits for a started migration's job to appear in "
        "libvirt before the coordinator follows the cloud's migration record instead.",
    ),
    cfg.FloatOpt(
        "postcopy_resume_first_s",
        default=2.0,
        min=0.05,
        help="A post-copy migration whose link broke after the switch (the VM paused on "
        "both hosts) is resumed at once and then after this many seconds, the wait "
        "doubling up to postcopy_resume_max_s, until it resumes or the deadline passes.",
    ),
    cfg.FloatOpt(
        "postcopy_resume_max_s",
        default=30.0,
        min=0.05,
        help="The longest wait between two tries to resume a broken post-copy migration.",
    ),
    cfg.FloatOpt(
        "postcopy_recovery_deadline_s",
        default=900.0,
        min=1.0,
        help="How long a broken post-copy migration is tried again before the coordinator "
        "gives up and reports the VM stranded (it runs nowhere; the event and the VM's "
        "error say where its halves are). A target that has no copy of the VM any more "
        "is reported at once. The coordinator never aborts such a migration.",
    ),
    cfg.IntOpt("max_attempts", default=2, min=1, max=10, help="Attempts per VM."),
    cfg.IntOpt(
        "dirty_rate_window_s",
        default=2,
        min=1,
        max=60,
        help="Window of the fresh dirty-rate measurement taken before planning (with one "
        "of half of it: a working set rewritten within both is found).",
    ),
    cfg.IntOpt(
        "dirty_rate_max_window_s",
        default=8,
        min=1,
        max=60,
        help="Longest window the coordinator doubles that measurement to, for the guests "
        "whose working set the shorter windows did not find (a fast writer over a large "
        "set). Planning waits for it; 0 extra windows when it is not above "
        "dirty_rate_window_s.",
    ),
    cfg.FloatOpt(
        "dirty_rate_max_age_s",
        default=120.0,
        min=0,
        help="Plan on the source agent's background dirty-rate readings (its "
        "[dirty_rate] schedule) when each window's is at most this old, instead of "
        "measuring before planning; older or missing readings are measured afresh. A "
        "reading as old as this misses a change of load within that time: the run's "
        "escalation catches a writer faster than planned. 0: always measure.",
    ),
]

# -- journal schema and high availability ([database] additions, [coordination]) ----

database_schema_opts = [
    cfg.BoolOpt(
        "auto_upgrade",
        default=True,
        help="Upgrade the journal's schema to the newest revision when the coordinator "
        "starts (creating it in an empty database). With false, schema changes are "
        "applied by an operator with `hostmaint-coordinator-db upgrade`, and the "
        "coordinator refuses to start on an older schema.",
    ),
]

coordination_opts = [
    cfg.StrOpt(
        "backend_url",
        default="",
        secret=True,
        help="The coordination service (a tooz URL) through which several coordinators "
        "elect one leader and lock the hosts they drain, e.g. etcd3+http://etcd1:2379. "
        "Empty: one coordinator process, no coordination service.",
    ),
    cfg.StrOpt(
        "group",
        default="hostmaint-coordinator",
        help="The coordinators' group in the coordination service; coordinators sharing "
        "one journal share one group.",
    ),
    cfg.StrOpt(
        "member_id",
        default="",
        help="This coordinator's name in the group. Default: the host name and process id.",
    ),
    cfg.IntOpt(
        "lease_ttl_s",
        default=10,
        min=3,
        max=300,
        help="Seconds the leadership and the host locks of a coordinator that stopped "
        "heartbeating outlive it: the longest a standby waits before taking over.",
    ),
    cfg.FloatOpt(
        "heartbeat_interval_s",
        default=2.0,
        min=0.1,
        help="Seconds between two heartbeats that keep the leases alive; also how often a "
        "standby tries to take the leadership. Must stay well below lease_ttl_s.",
    ),
]

# -- end of journal schema and high availability --------------------------------------

roll_opts = [
    cfg.StrOpt(
        "hook_dir",
        default="",
        help="The directory of the hooks a roll may run (hostmaint roll --hook NAME): a "
        "roll names an executable file here, with its arguments, and the coordinator runs "
        "it with the host's name appended, without a shell. Empty: rolls run no hooks.",
    ),
    cfg.FloatOpt(
        "hook_timeout_s",
        default=3600.0,
        min=1.0,
        help="Seconds a roll's hook may run on one host before it is killed and the roll "
        "stops; a roll may ask for another timeout.",
    ),
    cfg.FloatOpt(
        "back_timeout_s",
        default=900.0,
        min=1.0,
        help="Seconds a host has, after its hook, to come back (its agent serving and "
        "reporting its hypervisor and libvirt versions, its compute service up) before "
        "the roll stops.",
    ),
    cfg.FloatOpt(
        "maintenance_s",
        default=0.0,
        min=0.0,
        help="The time one wave's maintenance (the hook and the hosts' return) is expected "
        "to take, added to each wave's predicted drain time in a roll's plan.",
    ),
    cfg.FloatOpt(
        "cpu_allocation_ratio",
        default=1.0,
        min=0.0,
        help="The vCPUs a host may hold per CPU the cloud reports for it, when a roll "
        "plans its hosts' capacity (1.0 where the driver's counts are vCPUs already, as "
        "the libvirt driver's are).",
    ),
]

GROUPS = {
    "grpc": grpc_opts,
    "database": database_opts + database_schema_opts,
    "agents": agents_opts,
    "driver": driver_opts,
    "libvirt_driver": libvirt_driver_opts,
    "nova": nova_opts,
    "drain": drain_opts,
    "coordination": coordination_opts,
    "roll": roll_opts,
    "metrics": metrics_opts(9711),
}


def register_opts(conf: cfg.ConfigOpts) -> None:
    for group, opts in GROUPS.items():
        conf.register_opts(opts, group=group)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    return [(group, list(opts)) for group, opts in GROUPS.items()]
