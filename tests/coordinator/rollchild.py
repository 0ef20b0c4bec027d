"""A coordinator process for the kill test: the roll world's cloud in a file
(`FileSimDriver`), its journal and hooks in WORKDIR; resumes what the journal holds,
prints its port, serves until killed.

    python -m tests.coordinator.rollchild WORKDIR
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hostmaint.common import daemon
from hostmaint.coordinator.cmd import SERVICE_NAME
from hostmaint.coordinator.executor import Executor, ExecutorSettings
from hostmaint.coordinator.journal import Journal, make_engine
from hostmaint.coordinator.model import GIB, DrainPolicy, Link
from hostmaint.coordinator.rollrun import Rolls, RollSettings
from hostmaint.coordinator.servicer import CoordinatorServicer
from hostmaint.protos import coordinator_pb2_grpc
from tests.coordinator.filesimdriver import FileSimDriver
from tests.coordinator.rollworld import LINK_BYTES_PER_S, POLL_S, cloud
from tests.coordinator.simagents import SimAgents


def main(workdir: Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(message)s")
    hosts, instances, guests = cloud()
    driver = FileSimDriver(
        workdir / "cloud.pickle", hosts, instances, link=Link(LINK_BYTES_PER_S), time_scale=0.01
    )
    agents = SimAgents(driver, guests, LINK_BYTES_PER_S, host_memory_bytes=16 * GIB)
    registry: Any = agents
    journal = Journal(make_engine(f"sqlite:///{workdir / 'journal.db'}"), clock=time.time)
    executor = Executor(
        driver,
        registry,
        journal,
        ExecutorSettings(
            defaults=DrainPolicy(),
            link_bandwidth_bytes_per_s=LINK_BYTES_PER_S,
            poll_interval_s=POLL_S,
            watch_start_timeout_s=0.5,
        ),
        clock=time.time,
    )
    rolls = Rolls(
        executor,
        RollSettings(hook_dir=str(workdir / "hooks"), poll_interval_s=POLL_S),
        clock=time.time,
    )
    servicer = CoordinatorServicer(executor, registry, rolls)
    server = daemon.build_server(
        "127.0.0.1:0",
        lambda s: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, s),
        [SERVICE_NAME],
        tls=daemon.TlsFiles("", "", ""),
        insecure=False,
    )
    executor.resume_all()
    rolls.resume_all()  # after their drains, as cmd.Coordinator does
    server.server.start()
    server.set_serving(True)
    print(server.port, flush=True)
    threading.Event().wait()  # until killed
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
