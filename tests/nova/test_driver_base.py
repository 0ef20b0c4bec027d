"""The driver contract's pure parts, without a Nova."""

import subprocess
import sys

import pytest

from hostmaint.coordinator.drivers import Conflict, MigrationState, Unavailable
from hostmaint.coordinator.drivers.nova import NovaUnavailable, parse_microversion


def test_contract_imports_no_client_library() -> None:
    code = (
        "import sys, hostmaint.coordinator.drivers\n"
        "print(','.join(m for m in ('openstack', 'keystoneauth1', 'requests', 'grpc',"
        " 'libvirt') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_finished_states() -> None:
    finished = {s for s in MigrationState if s.finished}
    assert finished == {
        MigrationState.COMPLETED,
        MigrationState.FAILED,
        MigrationState.CANCELLED,
        MigrationState.ERROR,
    }


@pytest.mark.parametrize(("text", "value"), [("2.30", (2, 30)), ("2.104", (2, 104))])
def test_microversions_compare_as_numbers(text: str, value: tuple[int, int]) -> None:
    assert parse_microversion(text) == value
    assert parse_microversion("2.104") > parse_microversion("2.80")


def test_errors_carry_their_fields() -> None:
    err = NovaUnavailable(
        "gone", method="POST", path="/x", status=503, attempts=1, may_have_acted=True
    )
    assert isinstance(err, Unavailable)
    assert (err.method, err.status, err.attempts, err.may_have_acted) == ("POST", 503, 1, True)
    assert "POST /x -> 503" in str(err)
    assert Conflict("busy", status=409).message == "busy"
