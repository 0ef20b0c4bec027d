"""Who may call which RPC: a pure decision from the caller's identities and the method.

The gRPC interceptor (common/daemon.py) reads the transport, the verified
certificate's identities and the peer address from the call and asks `decide`.
Methods outside `Policy.protected_methods` are open to every caller the
transport admitted (with mutual TLS: any certificate from the configured CA).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass


class Transport(enum.StrEnum):
    TLS = "tls"
    PLAINTEXT = "plaintext"


class PlaintextPolicy(enum.StrEnum):
    """Whether protected methods are served over plaintext, which carries no identity."""

    LOOPBACK = "loopback"  # only to callers on this machine
    ALWAYS = "always"  # to anyone who reaches the port
    NEVER = "never"


@dataclass(frozen=True)
class Peer:
    transport: Transport
    identities: frozenset[str]
    address: str  # gRPC's peer string: ipv4:127.0.0.1:5000, ipv6:[::1]:5000, unix:...

    @property
    def loopback(self) -> bool:
        return is_loopback_peer(self.address)


@dataclass(frozen=True)
class Policy:
    protected_methods: frozenset[str]  # full names: /hostmaint.v1.HostAgent/Migrate
    allowed_identities: frozenset[str]  # certificate CNs or DNS SANs, compared case-blind
    plaintext: PlaintextPolicy

    @classmethod
    def of(
        cls, protected: Iterable[str], allowed: Iterable[str], plaintext: PlaintextPolicy
    ) -> Policy:
        return cls(
            frozenset(protected),
            frozenset(a.strip().lower() for a in allowed if a.strip()),
            plaintext,
        )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


def is_loopback_peer(address: str) -> bool:
    """True for a gRPC peer string naming this machine (loopback IP or unix socket)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    kind, _, rest = address.partition(":")
    if kind == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    else:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def decide(policy: Policy, peer: Peer, method: str) -> Decision:
    if method not in policy.protected_methods:
        return Decision(True, "not a protected method")
    if peer.transport is Transport.PLAINTEXT:
        if policy.plaintext is PlaintextPolicy.ALWAYS:
            return Decision(True, "plaintext_mutations = always")
        if policy.plaintext is PlaintextPolicy.LOOPBACK and peer.loopback:
            return Decision(True, "plaintext caller on loopback")
        return Decision(
            False,
            f"{method} needs a client certificate (plaintext_mutations = {policy.plaintext})",
        )
    matched = sorted(i for i in peer.identities if i.lower() in policy.allowed_identities)
    if matched:
        return Decision(True, f"identity {matched[0]} is allowed")
    shown = ",".join(sorted(peer.identities)) or "(none)"
    return Decision(False, f"{method} is not allowed to identity {shown}")
