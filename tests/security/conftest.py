"""The mutual-TLS fixtures (tests/tlscluster.py)."""

from tests.tlscluster import node, pki, plaintext_agent, tls_agent, tls_cluster

__all__ = ["node", "pki", "plaintext_agent", "tls_agent", "tls_cluster"]
