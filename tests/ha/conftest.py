from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.ha.etcdserver import ETCD, EtcdServer


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    if not os.access(ETCD, os.X_OK):
        pytest.skip(f"no {ETCD} (Debian package etcd-server)")
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def group() -> str:
    """A coordination group of the test's own on the shared etcd."""
    return f"hostmaint-test-{uuid.uuid4().hex[:12]}"
