"""A throwaway single-member etcd for tests: Debian's etcd on 127.0.0.1, random
ports, a temporary data directory; never the system service."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.ports import free_port

ETCD = "/usr/bin/etcd"


class EtcdServer:
    def __init__(self, binary: str = ETCD) -> None:
        self.binary = binary
        self.base = Path(tempfile.mkdtemp(prefix="hostmaint-etcd-"))
        self.client_port = free_port()
        self.peer_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def tooz_url(self) -> str:
        return f"etcd3+http://127.0.0.1:{self.client_port}"

    def start(self, timeout_s: float = 30.0) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = (self.base / "etcd.log").open("wb")
        self._proc = subprocess.Popen(
            [
                self.binary,
                "--name=hostmaint-test",
                f"--data-dir={self.base / 'data'}",
                f"--listen-client-urls={self.client_url}",
                f"--advertise-client-urls={self.client_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=hostmaint-test={peer}",
                "--initial-cluster-state=new",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.client_url}/health", timeout=1) as r:
                    if json.load(r).get("health") == "true":
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.base / "etcd.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
        finally:
            self._proc = None
            shutil.rmtree(self.base, ignore_errors=True)
