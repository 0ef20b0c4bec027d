"""Pure modules import no I/O libraries: checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

IMPURE = ("libvirt", "grpc", "psutil", "oslo_config", "sqlalchemy", "openstack")
PURE_MODULES = [
    "hostmaint.agent.inventory",
    "hostmaint.agent.tuning",
    "hostmaint.agent.types",
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
