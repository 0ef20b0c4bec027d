"""Pure modules: importing them pulls in no I/O library, and they never read the clock.

Checked in a fresh interpreter, so nothing imported by other tests hides a leak.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys

import pytest

IMPURE = ("libvirt", "grpc", "psutil", "oslo_config", "sqlalchemy", "openstack")
PURE_MODULES = [
    "hostmaint.agent.capabilities",
    "hostmaint.agent.inventory",
    "hostmaint.agent.stale",
    "hostmaint.agent.tuning",
    "hostmaint.agent.types",
    "hostmaint.coordinator.model",
    "hostmaint.coordinator.convergence",
    "hostmaint.coordinator.planner",
    "hostmaint.coordinator.planstrategy",
    "hostmaint.coordinator.plantuning",
    "hostmaint.coordinator.placement",
    "hostmaint.coordinator.bounds",
    "hostmaint.common.dirty",
    "hostmaint.coordinator.simulator",
    "hostmaint.coordinator.baselines",
    "hostmaint.coordinator.scenarios",
    "hostmaint.coordinator.calibrate",
    "hostmaint.coordinator.bench",
    "hostmaint.coordinator.dispatch",
    "hostmaint.coordinator.escalation",
    "hostmaint.coordinator.forecast",
    "hostmaint.coordinator.cpucheck",
    "hostmaint.coordinator.cliview",
    "hostmaint.coordinator.clilive",
    "hostmaint.coordinator.cliformat",
    "hostmaint.coordinator.limits",
    "hostmaint.coordinator.resume",
    "hostmaint.coordinator.reconcile",
    "hostmaint.coordinator.roll",
    "hostmaint.coordinator.rolltypes",
    "hostmaint.coordinator.rollcloud",
    "hostmaint.coordinator.rollaudit",
    "hostmaint.coordinator.rollpredict",
    "hostmaint.coordinator.pinning",
    "hostmaint.coordinator.cliroll",
    "hostmaint.coordinator.states",
    "hostmaint.coordinator.timeline",
    "hostmaint.coordinator.report",
]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_io(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"bad = [m for m in {IMPURE!r} if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_never_reads_the_clock(module: str) -> None:
    src = inspect.getsource(importlib.import_module(module))
    for clock in (
        r"^\s*import time\b",
        r"^\s*from time import",
        r"\.now\(",
        r"utcnow\(",
        r"\btoday\(",
        r"monotonic\(",
    ):
        assert not re.search(clock, src, re.M), f"{module} reads the clock ({clock})"
