"""The sample Grafana dashboard queries only metrics the daemons export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from hostmaint.agent.metrics import AgentCollector
from hostmaint.common import metrics
from hostmaint.coordinator.metrics import PREFIX, AgentsCollector, CoordinatorMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


class _NoAgents:
    def statuses(self) -> list[object]:
        return []


class _Tracker:
    def current(self, domain_uuid: str) -> None:
        return None


class _NoDomains:
    tracker = _Tracker()

    def domains(self) -> list[object]:
        return []


def _exported() -> set[str]:
    names: set[str] = set()
    coordinator = CoordinatorMetrics()
    coordinator.registry.register(AgentsCollector(_NoAgents(), lambda: True))  # type: ignore[arg-type]
    agent = CollectorRegistry()
    agent.register(AgentCollector(_NoDomains()))  # type: ignore[arg-type]
    metrics.rpc_counter(agent, "hostmaint_agent")
    for registry in (coordinator.registry, agent):
        for family in registry.collect():
            names.add(family.name)
    return names


def _queried() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    assert exprs
    found = set()
    for expr in exprs:
        for name in re.findall(rf"\b{PREFIX}_[a-z_]+", expr):
            for suffix in _SUFFIXES:
                name = name.removesuffix(suffix)
            found.add(name)
    return found


def test_every_queried_metric_is_exported() -> None:
    queried = _queried()
    assert queried - _exported() == set()
    assert {"hostmaint_migration_max_downtime_seconds", "hostmaint_agent_call_errors"} <= queried
