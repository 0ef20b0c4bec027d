"""The agent's options (oslo.config), registered on a private ConfigOpts."""

from __future__ import annotations

from oslo_config import cfg

from hostmaint.common.options import metrics_opts

libvirt_opts = [
    cfg.StrOpt(
        "uri",
        default="qemu:///system",
        help="The libvirt connection URI of the host this agent serves.",
    ),
    cfg.ListOpt(
        "shared_storage_paths",
        default=[],
        help="Path prefixes of disk images on storage every compute host mounts (for "
        "example an NFS-backed /var/lib/nova/instances). Disks there need no block migration.",
    ),
]

grpc_opts = [
    cfg.StrOpt("listen", default="0.0.0.0:7710", help="The host:port the gRPC server binds."),
    cfg.BoolOpt(
        "insecure",
        default=False,
        help="Serve plaintext gRPC on a non-loopback address. Only for labs: anyone who "
        "reaches the port can then read the host, and tune and start migrations if "
        "plaintext_mutations is always. Without TLS and without this the agent refuses "
        "to start on any address but loopback.",
    ),
    cfg.StrOpt(
        "cert_file",
        default="",
        help="The server certificate (PEM) for mutual TLS. With cert_file, key_file and "
        "ca_file set every client must present a certificate signed by ca_file.",
    ),
    cfg.StrOpt("key_file", default="", help="The server private key (PEM) for mutual TLS."),
    cfg.StrOpt("ca_file", default="", help="The CA (PEM) that signs the clients' certificates."),
    cfg.ListOpt(
        "allowed_coordinators",
        default=[],
        help="Client identities (a certificate's common name or one of its DNS subject "
        "alternative names) that may call the RPCs that change domains: Migrate and "
        "TuneMigration. Any other client with a certificate from ca_file may still read "
        "(GetHost, ListDomains, MeasureDirtyRate, CheckCpuCompatibility, WatchMigration, "
        "health). Empty: no client over TLS may change anything.",
    ),
    cfg.StrOpt(
        "plaintext_mutations",
        default="loopback",
        choices=[
            (
                "loopback",
                "Allowed to callers on this machine only (the default, for "
                "development and labs on 127.0.0.1).",
            ),
            (
                "always",
                "Allowed to anyone who reaches the port (with insecure = true: "
                "anyone on the network).",
            ),
            ("never", "Refused over plaintext: only mutual TLS identities may change domains."),
        ],
        help="Whether Migrate and TuneMigration are served over plaintext gRPC, which "
        "carries no identity. Has no effect when TLS is configured. The default trusts "
        "every local process, which suits a development host or a lab on loopback; set "
        "never on a host with untrusted local users.",
    ),
    cfg.FloatOpt(
        "grace_s",
        default=10.0,
        min=0,
        help="Seconds in-flight calls may take to finish when the agent stops.",
    ),
    cfg.IntOpt("max_workers", default=32, min=4, help="Threads serving gRPC calls."),
]

dirty_rate_opts = [
    cfg.BoolOpt(
        "enabled",
        default=True,
        help="Measure the dirty-page rate of every running domain in the background.",
    ),
    cfg.FloatOpt(
        "interval_s",
        default=60.0,
        min=1,
        help="Seconds between two background measurements of the same domain.",
    ),
    cfg.IntOpt(
        "window_s",
        default=2,
        min=1,
        max=60,
        help="The measurement window in seconds (libvirt measures whole seconds).",
    ),
    cfg.IntOpt(
        "max_window_s",
        default=8,
        min=1,
        max=60,
        help="The longest window the background measurement doubles to: each domain is "
        "measured over half the window and the window, then over doubled windows up to "
        "this one while they find more of its working set. ListDomains reports the latest "
        "reading over each window, so a coordinator plans without measuring.",
    ),
    cfg.IntOpt(
        "batch_size",
        default=8,
        min=1,
        help="Domains measured at once; a host's domains are spread over the interval in "
        "batches so a host with many domains is not measured all at once.",
    ),
    cfg.StrOpt(
        "method",
        default="auto",
        choices=["auto", "page-sampling", "dirty-bitmap", "dirty-ring"],
        help="How to measure: auto picks the best each domain supports (dirty-ring when the "
        "domain has it, else dirty-bitmap, which was exact on real guests, else page-sampling).",
    ),
]

migration_opts = [
    cfg.StrOpt(
        "interface",
        default="",
        help="The network interface migrations leave by; its speed is reported.",
    ),
    cfg.FloatOpt(
        "watch_interval_s",
        default=1.0,
        min=0.05,
        help="Default seconds between two progress samples of a watched migration.",
    ),
    cfg.ListOpt(
        "allowed_destinations",
        default=[],
        help="The libvirt URIs Migrate may send domains to, each exact "
        "(qemu+tls://host2/system) or a shell-style pattern (qemu+tls://*.compute.example/"
        "system). A destination must use a qemu scheme (qemu+tcp, qemu+tls, qemu+ssh, "
        "qemu+unix, qemu). Empty: every migration is refused until peers are configured.",
    ),
    cfg.ListOpt(
        "allowed_migration_hosts",
        default=[],
        help="Hosts the migration stream (MigrateOptions.migration_uri, tcp://host[:port]) "
        "may go to: names, addresses or networks (10.1.0.0/24), besides the host names of "
        "allowed_destinations. Any other migration_uri is refused.",
    ),
    cfg.FloatOpt(
        "stale_incoming_grace_s",
        default=120.0,
        min=0,
        help="Seconds after which an incoming migration copy left behind is destroyed: a "
        "domain paused for a migration (or for an unknown reason, or starting up) that "
        "runs no job, is transient and whose vCPUs never ran here, seen so at every check "
        "for this long. A destination libvirtd restarted during a migration leaves such "
        "copies; the VM itself runs elsewhere. 0: never destroyed.",
    ),
]

GROUPS = {
    "libvirt": libvirt_opts,
    "grpc": grpc_opts,
    "dirty_rate": dirty_rate_opts,
    "migration": migration_opts,
    "metrics": metrics_opts(9710),
}


def register_opts(conf: cfg.ConfigOpts) -> None:
    for group, opts in GROUPS.items():
        conf.register_opts(opts, group=group)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    return [(group, list(opts)) for group, opts in GROUPS.items()]
