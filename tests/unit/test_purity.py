"""The decision modules are pure: importing them pulls in no I/O library."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "model",
    "planner",
    "simulator",
    "baselines",
    "scenarios",
    "calibrate",
    "bench",
]
BANNED = ["libvirt", "grpc", "psutil", "oslo_config"]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io_library(module: str) -> None:
    code = (
        "import sys, importlib\n"
        f"importlib.import_module('hostmaint.coordinator.{module}')\n"
        f"print(','.join(m for m in {BANNED!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_pure_modules_never_read_the_clock() -> None:
    import importlib
    import inspect

    for module in PURE:
        src = inspect.getsource(importlib.import_module(f"hostmaint.coordinator.{module}"))
        for clock in ("import time", "from time", "datetime", "monotonic("):
            assert clock not in src, f"{module} reads the clock ({clock})"
