"""hostmaint-coordinator-db: the journal's schema, for operators who apply it themselves.

    hostmaint-coordinator-db --config-file /etc/hostmaint/coordinator.conf upgrade
    hostmaint-coordinator-db --config-file /etc/hostmaint/coordinator.conf current

`upgrade` brings the [database] url's schema to the newest revision (creating
it in an empty database); `current` prints the revision it is at and whether
that is the newest (exit status 1 when it is not).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from oslo_config import cfg

from hostmaint.common import daemon
from hostmaint.common.errors import MissingExtra
from hostmaint.coordinator import config, migrations
from hostmaint.coordinator.journal import make_engine

PROG = "hostmaint-coordinator-db"


def _register(conf: cfg.ConfigOpts) -> None:
    config.register_opts(conf)
    conf.register_cli_opt(
        cfg.SubCommandOpt(
            "action",
            title="actions",
            handler=lambda sub: [
                sub.add_parser("upgrade", help="Upgrade the schema to the newest revision."),
                sub.add_parser("current", help="Print the schema's revision."),
            ],
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    conf = daemon.load_config(sys.argv[1:] if argv is None else argv, PROG, _register)
    try:
        engine = make_engine(conf.database.url)
    except MissingExtra as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    try:
        if conf.action.name == "upgrade":
            print(migrations.upgrade(engine))
            return 0
        now, head = migrations.current(engine), migrations.head()
        print(f"{now or 'none'} (newest: {head})")
        return 0 if now == head else 1
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
