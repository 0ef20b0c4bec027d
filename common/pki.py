"""A small certificate authority for labs and tests: a CA, server and client certificates.

Production deployments bring their own PKI; this makes the PEM files the
daemons' `[grpc] cert_file/key_file/ca_file` options point at, so a lab or a
test runs with mutual TLS exactly as production does.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_VALIDITY = datetime.timedelta(days=365)
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertFiles:
    """Where one certificate, its key and the CA that signed it were written."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates as PEM files."""

    def __init__(
        self,
        directory: Path,
        *,
        common_name: str = "hostmaint-ca",
        now: datetime.datetime,
        validity: datetime.timedelta = DEFAULT_VALIDITY,
    ) -> None:
        self.directory = directory
        self._now = now
        self._validity = validity
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(common_name)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def _issue(
        self,
        stem: str,
        common_name: str,
        names: Sequence[str],
        usage: x509.ObjectIdentifier,
        not_before: datetime.datetime | None,
        not_after: datetime.datetime | None,
    ) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or self._now - datetime.timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(not_after or self._now + self._validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(_alt_names(names)), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        cert_file = self.directory / f"{stem}.pem"
        key_file = self.directory / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.touch(mode=0o600)
        key_file.write_bytes(_key_pem(key))
        return CertFiles(cert_file, key_file, self.ca_file)

    def server(
        self,
        stem: str,
        names: Sequence[str] = SERVER_NAMES,
        *,
        common_name: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> CertFiles:
        """A server certificate for `names` (host names and addresses, as SANs)."""
        return self._issue(
            stem,
            common_name or (names[0] if names else stem),
            names,
            ExtendedKeyUsageOID.SERVER_AUTH,
            not_before,
            not_after,
        )

    def client(
        self,
        stem: str,
        identity: str,
        *,
        dns_names: Sequence[str] = (),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> CertFiles:
        """A client certificate whose CN is `identity` (plus optional DNS SANs)."""
        return self._issue(
            stem,
            identity,
            dns_names,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            not_before,
            not_after,
        )
