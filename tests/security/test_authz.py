"""The authorisation decision, as a pure function: identities and method in, verdict out."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostmaint.common.authz import (
    Peer,
    PlaintextPolicy,
    Policy,
    Transport,
    decide,
    is_loopback_peer,
)

MIGRATE = "/hostmaint.v1.HostAgent/Migrate"
TUNE = "/hostmaint.v1.HostAgent/TuneMigration"
LIST = "/hostmaint.v1.HostAgent/ListDomains"
POLICY = Policy.of([MIGRATE, TUNE], ["Coordinator.Example", " ops-1 "], PlaintextPolicy.LOOPBACK)


def tls(*identities: str, address: str = "ipv4:10.0.0.5:4000") -> Peer:
    return Peer(Transport.TLS, frozenset(identities), address)


def plain(address: str) -> Peer:
    return Peer(Transport.PLAINTEXT, frozenset(), address)


@pytest.mark.parametrize("identity", ["coordinator.example", "COORDINATOR.example", "ops-1"])
def test_an_allowed_identity_may_mutate(identity: str) -> None:
    for method in (MIGRATE, TUNE):
        decision = decide(POLICY, tls("some-cn", identity), method)
        assert decision.allowed
        assert identity in decision.reason


def test_another_identity_is_denied_mutations_but_may_read() -> None:
    peer = tls("intruder", "intruder.example")
    denied = decide(POLICY, peer, MIGRATE)
    assert not denied.allowed
    assert "intruder" in denied.reason
    assert decide(POLICY, peer, LIST).allowed


def test_no_identity_and_empty_allow_list_deny() -> None:
    assert not decide(POLICY, tls(), TUNE).allowed
    nobody = Policy.of([MIGRATE], [], PlaintextPolicy.NEVER)
    assert not decide(nobody, tls("coordinator.example"), MIGRATE).allowed


@pytest.mark.parametrize(
    ("mode", "address", "allowed"),
    [
        (PlaintextPolicy.LOOPBACK, "ipv4:127.0.0.1:5000", True),
        (PlaintextPolicy.LOOPBACK, "ipv4:127.3.4.5:5000", True),
        (PlaintextPolicy.LOOPBACK, "ipv6:[::1]:5000", True),
        (PlaintextPolicy.LOOPBACK, "unix:/run/agent.sock", True),
        (PlaintextPolicy.LOOPBACK, "ipv4:10.0.0.9:5000", False),
        (PlaintextPolicy.LOOPBACK, "ipv6:[fe80::1%eth0]:5000", False),
        (PlaintextPolicy.LOOPBACK, "", False),
        (PlaintextPolicy.ALWAYS, "ipv4:10.0.0.9:5000", True),
        (PlaintextPolicy.NEVER, "ipv4:127.0.0.1:5000", False),
    ],
)
def test_plaintext_mutations(mode: PlaintextPolicy, address: str, allowed: bool) -> None:
    policy = Policy.of([MIGRATE], ["coordinator.example"], mode)
    assert decide(policy, plain(address), MIGRATE).allowed is allowed
    assert decide(policy, plain(address), LIST).allowed  # reads need no identity


@given(
    identities=st.frozensets(st.text(min_size=0, max_size=20), max_size=4),
    method=st.sampled_from([MIGRATE, TUNE, LIST, "/x/y"]),
    address=st.text(max_size=30),
)
def test_mutation_allowed_only_with_an_allowed_identity(
    identities: frozenset[str], method: str, address: str
) -> None:
    decision = decide(POLICY, Peer(Transport.TLS, identities, address), method)
    if method in (MIGRATE, TUNE):
        allowed = {i.lower() for i in identities} & POLICY.allowed_identities
        assert decision.allowed is bool(allowed)
    else:
        assert decision.allowed


@given(address=st.text(max_size=40))
def test_loopback_parsing_never_raises(address: str) -> None:
    assert is_loopback_peer(address) in (True, False)


def test_authz_is_pure() -> None:
    code = (
        "import sys, hostmaint.common.authz\n"
        "print(','.join(m for m in ('grpc', 'libvirt', 'oslo_config', 'psutil')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
