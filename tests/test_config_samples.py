"""The sample config files in etc/ are what oslo-config-generator makes of the
options, and oslo-config-validator finds in them nothing the options lack."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DAEMONS = ["agent", "coordinator"]  # each sample is generated from namespace hostmaint.<daemon>
OPTION_LINE = re.compile(r"^#([A-Za-z0-9_]+ =)", re.MULTILINE)  # `#name = default`, not `# text`


def sample(daemon: str) -> Path:
    return ROOT / "etc" / f"hostmaint-{daemon}.conf.sample"


def validate(daemon: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "oslo-config-validator"),
            "--namespace",
            f"hostmaint.{daemon}",
            "--input-file",
            str(config),
            "--fatal-warnings",
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("daemon", DAEMONS)
def test_sample_is_current(daemon: str, tmp_path: Path) -> None:
    out = tmp_path / "sample.conf"
    generator = BIN / "oslo-config-generator"
    subprocess.run(
        [str(generator), "--namespace", f"hostmaint.{daemon}", "--output-file", str(out)],
        check=True,
        capture_output=True,
    )
    current = sample(daemon).read_text()
    assert out.read_text() == current, "run `tox -e genconfig` and commit etc/"


@pytest.mark.parametrize("daemon", DAEMONS)
def test_validator_accepts_the_sample(daemon: str, tmp_path: Path) -> None:
    """As shipped, and with every option it shows set (uncommented), so each is checked."""
    got = validate(daemon, sample(daemon))
    assert got.returncode == 0, got.stderr
    text, count = OPTION_LINE.subn(r"\1", sample(daemon).read_text())
    assert count >= 10, "the sample shows no options"
    uncommented = tmp_path / f"{daemon}.conf"
    uncommented.write_text(text)
    got = validate(daemon, uncommented)
    assert got.returncode == 0, got.stderr


@pytest.mark.parametrize("daemon", DAEMONS)
def test_validator_refuses_an_unknown_option(daemon: str, tmp_path: Path) -> None:
    config = tmp_path / f"{daemon}.conf"
    config.write_text("[grpc]\nlisten_adress = 127.0.0.1:7710\n")
    got = validate(daemon, config)
    assert got.returncode != 0
    assert "grpc/listen_adress is not part of the sample config" in got.stderr
