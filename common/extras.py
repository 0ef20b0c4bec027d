"""The optional backends, each in an extra of the package (setup.py's extras_require).

A plain install serves a single coordinator on SQLite and the agent; the
`ha` extra (tooz, etcd3gw) adds `[coordination] backend_url`, the `postgres`
extra (psycopg) a `postgresql+psycopg://` `[database] url`, the `metrics` extra
(prometheus-client) the `[metrics] listen` endpoint. Their modules
are imported only where that option is set, through `require`, never at
module load. The `osc` extra (python-openstackclient, osc-lib, cliff) adds
`openstack maintenance ...`: the OpenStack client finds the plugin (hostmaint.osc)
through its entry points and is the only one to import it, so it has
nothing to require.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from hostmaint.common.errors import MissingExtra

HA = "ha"
POSTGRES = "postgres"
METRICS = "metrics"
METRICS_OPTION = "[metrics] listen"


def require(extra: str, option: str, modules: Iterable[str]) -> None:
    """Imports `modules`; MissingExtra naming `extra` and `option` when one is not installed."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise MissingExtra(option, extra, e.name or name) from e
