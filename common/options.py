"""Options both daemons register alike (oslo.config), each in its own group."""

from __future__ import annotations

from oslo_config import cfg


def metrics_opts(example_port: int) -> list[cfg.Opt]:
    """The `[metrics]` group: the opt-in Prometheus endpoint."""
    return [
        cfg.StrOpt(
            "listen",
            default="",
            help="The host:port on which to serve Prometheus metrics over HTTP at /metrics "
            f"(for example 127.0.0.1:{example_port}). Empty: no metrics endpoint. It needs "
            "the metrics extra (pip install 'hostmaint[metrics]'). The endpoint has no TLS "
            "and no authentication: bind it to loopback or a management network.",
        ),
    ]
