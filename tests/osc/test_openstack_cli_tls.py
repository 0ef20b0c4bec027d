"""`openstack maintenance ...` over mutual TLS: the real `openstack` command against a coordinator
that requires client certificates (tests/tlscluster.py: two TLS agents on test:/// hosts, the
coordinator reaching them with its own client certificate)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostmaint.common.pki import CertFiles
from tests.agent.conftest import DOMAINS
from tests.osc.conftest import OpenStack
from tests.tlscluster import Pki, TlsCluster

pytestmark = pytest.mark.osc


def openstack(cluster: TlsCluster, tmp_path: Path) -> OpenStack:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return OpenStack(f"127.0.0.1:{cluster.coordinator.port}", home)


def tls_options(files: CertFiles) -> tuple[str, ...]:
    return (
        "--os-maintenance-cert",
        str(files.cert_file),
        "--os-maintenance-key",
        str(files.key_file),
        "--os-maintenance-ca",
        str(files.ca_file),
    )


def test_with_a_client_certificate(tls_cluster: TlsCluster, pki: Pki, tmp_path: Path) -> None:
    osc = openstack(tls_cluster, tmp_path)
    rows = osc.json(*tls_options(pki.operator), "maintenance", "agent", "list")
    assert {r["Host"]: r["Health"] for r in rows} == {"host1": "SERVING", "host2": "SERVING"}
    # The same files from the environment ...
    env = {
        "OS_MAINTENANCE_CERT": str(pki.operator.cert_file),
        "OS_MAINTENANCE_KEY": str(pki.operator.key_file),
        "OS_MAINTENANCE_CA": str(pki.operator.ca_file),
    }
    plan = osc.json("maintenance", "plan", "host1", "--target", "host2", env=env)
    assert {r["VM"] for r in plan} == {d.uuid for d in DOMAINS}
    # ... and from clouds.yaml.
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        "clouds:\n"
        "  lab:\n"
        "    auth: {auth_url: 'http://127.0.0.1:1/identity'}\n"
        f"    maintenance_endpoint: '{osc.address}'\n"
        f"    maintenance_cert: '{pki.operator.cert_file}'\n"
        f"    maintenance_key: '{pki.operator.key_file}'\n"
        f"    maintenance_ca: '{pki.operator.ca_file}'\n"
    )
    env = {"OS_CLIENT_CONFIG_FILE": str(clouds), "HOSTMAINT_COORDINATOR": ""}
    out = osc.run("--os-cloud", "lab", "maintenance", "status", "host1", env=env)
    assert out.returncode == 3, out.stderr
    assert out.stderr.startswith("openstack maintenance status: NOT_FOUND: "), out.stderr


def refused(osc: OpenStack, cluster: TlsCluster, *options: str) -> str:
    """`openstack maintenance drain` with these options: refused before anything is sent.

    Returns the one line it prints on stderr."""
    out = osc.run(*options, "maintenance", "drain", "host1", "--target", "host2", "-f", "json")
    assert out.returncode == 5, out.stderr
    assert out.stdout == ""
    (line,) = out.stderr.splitlines()  # nothing from gRPC's own logging
    assert line.startswith("openstack maintenance drain: UNAVAILABLE: "), line
    assert cluster.coordinator.journal.latest_drain("host1") is None
    return line


def test_without_a_client_certificate(tls_cluster: TlsCluster, pki: Pki, tmp_path: Path) -> None:
    osc = openstack(tls_cluster, tmp_path)
    line = refused(osc, tls_cluster)
    assert line.endswith(
        "(the coordinator closed the connection: if it requires mutual TLS, give "
        "--os-maintenance-cert, --os-maintenance-key, --os-maintenance-ca)"
    ), line
    # A CA alone is no client certificate: refused before anything is sent.
    out = osc.run("--os-maintenance-ca", str(pki.operator.ca_file), "maintenance", "agent", "list")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "openstack maintenance agent list: error: TLS needs all of "
        "--os-maintenance-cert, --os-maintenance-key, --os-maintenance-ca"
    )


@pytest.mark.parametrize("who", ["foreign", "wrong-ca"])
def test_a_ca_that_does_not_match(
    tls_cluster: TlsCluster, pki: Pki, tmp_path: Path, who: str
) -> None:
    """The coordinator's certificate checked against another CA: the client hangs up."""
    files = {
        "foreign": pki.foreign,  # a certificate and CA from another PKI
        "wrong-ca": CertFiles(pki.operator.cert_file, pki.operator.key_file, pki.foreign.ca_file),
    }[who]
    line = refused(openstack(tls_cluster, tmp_path), tls_cluster, *tls_options(files))
    assert "Ssl handshake failed" in line
    assert line.endswith(
        f"(the coordinator's certificate does not verify against --os-maintenance-ca "
        f"{files.ca_file})"
    ), line


def test_a_client_certificate_the_coordinator_does_not_accept(
    tls_cluster: TlsCluster, pki: Pki, tmp_path: Path
) -> None:
    """The right CA but an expired certificate: the coordinator hangs up."""
    line = refused(openstack(tls_cluster, tmp_path), tls_cluster, *tls_options(pki.expired))
    assert line.endswith(
        f"(the coordinator closed the TLS connection: it may not accept --os-maintenance-cert "
        f"{pki.expired.cert_file}: a client certificate from its CA, not expired)"
    ), line
