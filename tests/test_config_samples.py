"""The sample config files in etc/ are what oslo-config-generator makes of the options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("daemon", ["agent", "coordinator"])
def test_sample_is_current(daemon: str, tmp_path: Path) -> None:
    out = tmp_path / "sample.conf"
    generator = Path(sys.executable).parent / "oslo-config-generator"
    subprocess.run(
        [str(generator), "--namespace", f"hostmaint.{daemon}", "--output-file", str(out)],
        check=True,
        capture_output=True,
    )
    current = (ROOT / "etc" / f"hostmaint-{daemon}.conf.sample").read_text()
    assert out.read_text() == current, "run `tox -e genconfig` and commit etc/"
