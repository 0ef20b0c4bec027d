"""The `openstack` command of the virtualenv, and the mutual-TLS fixtures (tests/tlscluster.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.tlscluster import pki, tls_cluster

__all__ = ["OPENSTACK", "OpenStack", "pki", "tls_cluster"]

OPENSTACK = Path(sys.executable).parent / "openstack"


@dataclass(frozen=True)
class OpenStack:
    """`openstack ...` as a subprocess against the coordinator at `address`, in a HOME of its
    own and with no OS_* or HOSTMAINT_* variable from outside."""

    address: str
    home: Path

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`openstack ARGS` with the coordinator from the environment (unless `env` says)."""
        if not OPENSTACK.exists():
            pytest.skip(f"no {OPENSTACK}: install the osc extra (scripts/bootstrap.sh does)")
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "HOSTMAINT_"))}
        clean |= {"HOME": str(self.home), "HOSTMAINT_COORDINATOR": self.address}
        clean |= dict(env or {})
        return subprocess.run(
            [str(OPENSTACK), *args],
            capture_output=True,
            text=True,
            env=clean,
            timeout=timeout_s,
            check=False,
        )

    def json(self, *args: str, **kwargs: Any) -> Any:
        out = self.run(*args, "-f", "json", **kwargs)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
