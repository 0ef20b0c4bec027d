"""Errors of the local multi-host lab; each carries its fields as attributes."""

from __future__ import annotations

from pathlib import Path


class LabError(Exception):
    """Base of every error the lab raises."""


class PrerequisiteMissing(LabError):
    """Something the lab needs is not on this machine; the lab installs nothing itself."""

    def __init__(self, missing: list[str], hint: str) -> None:
        self.missing = missing
        self.hint = hint
        super().__init__(f"missing prerequisites: {', '.join(missing)} ({hint})")


class NotRoot(LabError):
    """The lab creates network namespaces and mounts: it needs root."""

    def __init__(self, uid: int) -> None:
        self.uid = uid
        super().__init__(f"the lab needs root (running as uid={uid})")


class LabAlreadyRunning(LabError):
    """A lab with this state directory is up: refuse to start a second one over it."""

    def __init__(self, state_dir: Path, alive_pids: list[int]) -> None:
        self.state_dir = state_dir
        self.alive_pids = alive_pids
        super().__init__(
            f"a lab is already running from {state_dir} (live pids: "
            f"{', '.join(map(str, alive_pids)) or 'none'}); run `hostmaint-lab down` first"
        )


class LabCrashed(LabError):
    """State of a previous lab exists but some of its processes are gone."""

    def __init__(self, state_dir: Path, dead: list[str], alive_pids: list[int]) -> None:
        self.state_dir = state_dir
        self.dead = dead
        self.alive_pids = alive_pids
        super().__init__(
            f"a previous lab in {state_dir} crashed ({len(dead)} recorded processes gone: "
            f"{', '.join(dead)}; still alive: {', '.join(map(str, alive_pids)) or 'none'}); "
            "run `hostmaint-lab up --recover` to restart what is missing, "
            "or `hostmaint-lab down` to clean it up"
        )


class LabNotRunning(LabError):
    """No lab state in this directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        super().__init__(f"no lab state in {state_dir}")


class LabBusy(LabError):
    """Another lab command holds the lock of this state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        super().__init__(f"another hostmaint-lab command is working on {state_dir}")


class SpecError(LabError):
    """The guest spec file is invalid."""

    def __init__(self, path: Path | None, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"invalid guest spec {path or '<inline>'}: {reason}")


class NetworkError(LabError):
    """Setting up or tearing down the lab network failed."""

    def __init__(self, command: list[str], output: str) -> None:
        self.command = command
        self.output = output
        super().__init__(f"`{' '.join(command)}` failed: {output.strip()}")


class SubnetCollision(LabError):
    """The lab subnet overlaps an address or route already on the machine."""

    def __init__(self, subnet: str, existing: str) -> None:
        self.subnet = subnet
        self.existing = existing
        super().__init__(f"lab subnet {subnet} collides with {existing}; pick another (--subnet)")


class HostStartFailed(LabError):
    """A lab host's libvirt daemon did not come up."""

    def __init__(self, host: str, reason: str, log_path: Path) -> None:
        self.host = host
        self.reason = reason
        self.log_path = log_path
        super().__init__(f"libvirtd of {host} did not start: {reason} (log: {log_path})")


class GuestStartFailed(LabError):
    """A lab guest could not be booted."""

    def __init__(self, guest: str, host: str, reason: str) -> None:
        self.guest = guest
        self.host = host
        self.reason = reason
        super().__init__(f"guest {guest} did not start on {host}: {reason}")


class GuestPlacementError(LabError):
    """A guest runs on no lab host or on more than one."""

    def __init__(self, guest: str, hosts: list[str]) -> None:
        self.guest = guest
        self.hosts = hosts
        super().__init__(f"guest {guest} runs on {len(hosts)} hosts: {', '.join(hosts) or 'none'}")
