"""A throwaway PostgreSQL cluster for tests: Debian's binaries, a temporary
directory, a unix socket in that directory and no TCP listener.

PostgreSQL refuses to run as root, so as root the cluster belongs to the
`postgres` user and every server command runs through `runuser`.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import sqlalchemy as sa

BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVER_USER = "postgres"


def find_bindir() -> Path | None:
    """The newest Debian PostgreSQL bin directory with a server and initdb."""
    found = [
        Path(d)
        for d in glob.glob(BIN_GLOB)
        if (Path(d) / "postgres").exists() and (Path(d) / "initdb").exists()
    ]
    found.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    return found[-1] if found else None


class PostgresCluster:
    """initdb + pg_ctl in `base` (a fresh directory), listening only on base/.s.PGSQL.5432."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self._as: list[str] = []
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            owner = pwd.getpwnam(SERVER_USER)  # KeyError: no such user
            self._as = ["runuser", "-u", SERVER_USER, "--"]
        self.base = Path(tempfile.mkdtemp(prefix="hostmaint-pg-", dir="/tmp"))
        if owner is not None:
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self._names = itertools.count(1)
        self._running = False

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SERVER_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        settings = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
        }
        with (self.data / "postgresql.conf").open("a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())
        try:
            self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                "60",
                "start",
            )
        except subprocess.CalledProcessError as e:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {e.stderr}\n{log}") from e
        self._running = True

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SERVER_USER}@/{database}?host={self.base}"

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"hostmaint_{next(self._names)}"
        engine = sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE {name}")
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        try:
            if self._running:
                self._run(
                    str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"
                )
                self._running = False
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
