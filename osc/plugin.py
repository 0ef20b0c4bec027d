"""The `maintenance` plugin of the OpenStack client (entry point `openstack.cli.extension`).

The commands (hostmaint.osc.v1, entry points `openstack.maintenance.v1`) talk
to the hostmaint coordinator over gRPC, not to a Keystone-catalogued API, so
they need no OpenStack credentials. Where the coordinator is and the client's
mutual TLS files come, first found first, from the global options, the
environment, then the cloud's entry in clouds.yaml:

| option | environment | clouds.yaml key |
| --- | --- | --- |
| `--os-maintenance-endpoint HOST:PORT` | `HOSTMAINT_COORDINATOR`, `OS_MAINTENANCE_ENDPOINT` | `maintenance_endpoint` |
| `--os-maintenance-cert FILE` | `OS_MAINTENANCE_CERT` | `maintenance_cert` |
| `--os-maintenance-key FILE` | `OS_MAINTENANCE_KEY` | `maintenance_key` |
| `--os-maintenance-ca FILE` | `OS_MAINTENANCE_CA` | `maintenance_ca` |
| `--os-maintenance-timeout S` | `OS_MAINTENANCE_TIMEOUT` | `maintenance_timeout` |

(the OpenStack client strips the `os_` of an option's name to look it up in clouds.yaml).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from osc_lib import utils

from hostmaint.common import daemon
from hostmaint.coordinator import client

API_NAME = "maintenance"
API_VERSION_OPTION = "os_maintenance_api_version"
DEFAULT_API_VERSION = "1"
API_VERSIONS = ("1",)

ENDPOINT = "maintenance_endpoint"
CERT = "maintenance_cert"
KEY = "maintenance_key"
CA = "maintenance_ca"
TIMEOUT = "maintenance_timeout"


def option(key: str) -> str:
    """The global option of a clouds.yaml key: maintenance_cert -> --os-maintenance-cert."""
    return "--os-" + key.replace("_", "-")


@dataclass(frozen=True)
class MaintenanceClient:
    """The coordinator this invocation talks to, checked before anything is sent."""

    address: str
    tls: daemon.TlsFiles
    timeout_s: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MaintenanceClient:
        """From the cloud's configuration (options and clouds.yaml merged); raises UsageError."""

        def text(key: str) -> str:
            value = config.get(key)
            return "" if value is None else str(value).strip()

        address = client.check_address(
            text(ENDPOINT) or client.DEFAULT_COORDINATOR, option(ENDPOINT)
        )
        tls = client.check_tls(
            text(CERT), text(KEY), text(CA), (option(CERT), option(KEY), option(CA))
        )
        try:
            timeout_s = float(text(TIMEOUT) or client.DEFAULT_TIMEOUT_S)
        except ValueError:
            raise client.UsageError(f"{option(TIMEOUT)} must be seconds") from None
        return cls(address, tls, client.check_timeout(timeout_s, option(TIMEOUT)))

    @contextmanager
    def connect(self) -> Iterator[client.Stub]:
        with client.connect(self.address, self.tls) as stub:
            yield stub


def make_client(instance: Any) -> MaintenanceClient:
    """Called by the OpenStack client the first time a command asks for `client_manager.maintenance`."""
    return MaintenanceClient.from_config(instance._cli_options.config)


def build_option_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The plugin's global options (their defaults from the environment)."""
    parser.add_argument(
        "--os-maintenance-api-version",
        metavar="<maintenance-api-version>",
        default=utils.env("OS_MAINTENANCE_API_VERSION"),
        help=f"hostmaint coordinator API version, default={DEFAULT_API_VERSION} "
        "(Env: OS_MAINTENANCE_API_VERSION)",
    )
    parser.add_argument(
        option(ENDPOINT),
        metavar="<host:port>",
        default=utils.env(client.COORDINATOR_ENV, "OS_MAINTENANCE_ENDPOINT"),
        help="the hostmaint coordinator's gRPC address "
        f"(Env: {client.COORDINATOR_ENV} or OS_MAINTENANCE_ENDPOINT; clouds.yaml: {ENDPOINT}; "
        f"default {client.DEFAULT_COORDINATOR})",
    )
    for key, what in (
        (CERT, "client certificate (PEM) for mutual TLS to the coordinator"),
        (KEY, "client private key (PEM) for mutual TLS to the coordinator"),
        (CA, "CA certificate (PEM) the coordinator's certificate is checked against"),
    ):
        env = "OS_" + key.upper()
        parser.add_argument(
            option(key),
            metavar="<file>",
            default=utils.env(env),
            help=f"{what} (Env: {env}; clouds.yaml: {key})",
        )
    parser.add_argument(
        option(TIMEOUT),
        metavar="<seconds>",
        default=utils.env("OS_MAINTENANCE_TIMEOUT"),
        help="deadline of each call to the coordinator but a drain's event stream "
        f"(Env: OS_MAINTENANCE_TIMEOUT; clouds.yaml: {TIMEOUT}; "
        f"default {client.DEFAULT_TIMEOUT_S:g})",
    )
    return parser
