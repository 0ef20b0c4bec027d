"""The agent's options (oslo.config), registered on a private ConfigOpts."""

from __future__ import annotations

from oslo_config import cfg

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
        "reaches the port can then tune and start migrations.",
    ),
    cfg.StrOpt("cert_file", default="", help="The server certificate (PEM) for mutual TLS."),
    cfg.StrOpt("key_file", default="", help="The server private key (PEM) for mutual TLS."),
    cfg.StrOpt("ca_file", default="", help="The CA (PEM) that signs the clients' certificates."),
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
        help="The only libvirt URIs Migrate may send domains to. Empty allows any qemu URI.",
    ),
]

GROUPS = {
    "libvirt": libvirt_opts,
    "grpc": grpc_opts,
    "dirty_rate": dirty_rate_opts,
    "migration": migration_opts,
}


def register_opts(conf: cfg.ConfigOpts) -> None:
    for group, opts in GROUPS.items():
        conf.register_opts(opts, group=group)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    return [(group, list(opts)) for group, opts in GROUPS.items()]
