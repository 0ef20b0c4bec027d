"""`SimDriver` whose cloud outlives the coordinator process: its state (where each VM
runs, the migrations, disabled hosts) is written to a file after every call and read
back by the next coordinator. Its clock is wall time, so a migration started by a
coordinator that was killed goes on, and ends, while no coordinator runs."""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.coordinator.simdriver import SimDriver

_STATE = ("_vms", "_disabled", "_next_id", "_moves", "_starts", "migrations_started")
_CALLS = (
    "disable_host",
    "enable_host",
    "host_enabled",
    "list_hosts",
    "list_instances",
    "get_instance",
    "start_live_migration",
    "latest_migration",
    "get_migration",
    "force_complete",
    "abort",
    "reset_to_active",
    "placement",
    "moves",
    "starts",
)


class FileSimDriver(SimDriver):
    def __init__(self, path: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, clock=time.time, **kwargs)
        self._path = path
        self._save_lock = threading.Lock()
        if path.exists():
            state = pickle.loads(path.read_bytes())
            for name in _STATE:
                setattr(self, name, state[name])
        else:
            self._save()

    def _save(self) -> None:
        with self._save_lock:
            with self._lock:
                data = pickle.dumps({name: getattr(self, name) for name in _STATE})
            tmp = self._path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self._path)


def _saving(name: str) -> Callable[..., Any]:
    plain = getattr(SimDriver, name)

    def method(self: FileSimDriver, *args: Any, **kwargs: Any) -> Any:
        try:
            return plain(self, *args, **kwargs)
        finally:
            self._save()

    method.__name__ = name
    return method


for _name in _CALLS:
    setattr(FileSimDriver, _name, _saving(_name))
