"""The agent daemon under concurrent client processes answers every call in full.

A real `hostmaint-agent` child on a test:/// host of 200 domains, 20 client
processes with their own channels calling ListDomains and the health Check
at once. Correctness only: the figures come from tools/bench_agent_load.py.
"""

from __future__ import annotations

from pathlib import Path

import psutil

from tests.agent.loadgen import agent_daemon, run_clients
from tests.agent.nodexml import many_domains, write_node

DOMAINS, CLIENTS, CALLS = 200, 20, 3


def test_every_client_gets_every_domain_under_load(tmp_path: Path) -> None:
    node = write_node(tmp_path / "node.xml", many_domains(DOMAINS), memory_kib=2**40 // 1024)
    with agent_daemon(node, tmp_path, max_workers=8) as agent:
        load = run_clients(agent.address, CLIENTS, CALLS)
        assert psutil.Process(agent.pid).is_running()  # still up after the load
    r = load.merged
    assert dict(r.errors) == {}
    # Every answer listed all 200 domains; every health check said SERVING.
    assert dict(r.domain_counts) == {DOMAINS: CLIENTS * CALLS}
    assert dict(r.health) == {"SERVING": CLIENTS * CALLS}
    assert len(r.list_s) == len(r.health_s) == CLIENTS * CALLS
    log = agent.log.read_text()
    assert agent.returncode == 0, log[-2000:]  # a clean stop on SIGTERM after the load
    assert "Traceback" not in log, log[-2000:]
