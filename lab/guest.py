"""The lab guest: a tiny multiboot kernel whose memory behaviour is known exactly.

The sources live in ``lab/guest_src/`` (``boot.S``, ``guest.c``, ``guest.ld``);
:func:`build_guest` compiles them with ``gcc -m32 -ffreestanding`` into a
32-bit multiboot ELF that QEMU boots with ``-kernel`` (libvirt ``<kernel>``)
and parameterises through the kernel command line (``-append`` /
``<cmdline>``), built by :func:`guest_cmdline` from a :class:`GuestSpec`.

Command line (all optional, space separated)::

    ws=<MiB>        working set rewritten cyclically (default 64)
    rate=<MiB/s>    target dirty rate, up to three decimals (default 0)
    mode=paced|cpu  paced: a fixed rate, rate/100 pages per 10 ms tick, one
                    store per page, so vCPU throttling barely slows it;
                    cpu: each page rewritten whole `work` times, as fast as
                    the vCPU allows up to the rate, owing at most 100 ms of
                    pages, so throttling slows it in proportion (default paced)
    fill=<MiB>|max  static non-zero data written once at boot (default 0)
    work=<passes>   whole-page passes per page in cpu mode (default 3)
    name=<text>     echoed in the ready line

Fill and working set sit side by side above the kernel (from 2 MiB) in the
usable RAM of the multiboot memory map; if they do not fit the guest prints
an error line and halts. Both are written with non-zero data at boot.

Serial (COM1) lines, one event per line, ``hmguest`` then ``key=value``
pairs; new keys may be added, existing ones keep their meaning::

    hmguest event=boot
    hmguest event=ready mem_mib=256 ws_mib=128 rate_mibps=40.000 mode=paced
        fill_mib=64 work=3 tsc_khz=2445417 region_base=0x00200000
        region_end=0x0ffe0000 fill_ms=612 boot_ms=2474 [name=vm1]
    hmguest event=progress t=12.04 dirtied_pages=123321 dirtied_mib=481.7
        rate_mibps=40.000 busy_pct=6.4 ws_mib=128 mode=paced
    hmguest event=error reason=no_memory need_mib=256 avail_mib=253

(``ready`` and ``progress`` are each on one line.) ``t`` is seconds since
ready, ``rate_mibps`` the rate achieved over the last report interval
(about 1 s), ``busy_pct`` the share of that interval the guest spent working
rather than halted, by its own clock (descheduled time inside the work counts
as busy). ``error`` reasons: ``no_memory``, ``no_memory_map``,
``bad_parameter`` (with ``key``), ``empty_working_set``, ``exception`` (with
``vector``), ``not_multiboot``, ``tsc_calibration``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

LOG = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "guest_src"
SOURCES = ("boot.S", "guest.c", "guest.ld")
LINE_PREFIX = "hmguest"

MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 2048
MAX_RATE_MIBPS = 2000.0
MAX_WORK = 100000
# Below the guest's regions: 2 MiB for BIOS, kernel and boot data, and the
# firmware's tables at the top of RAM. Fill plus working set must fit in the
# rest (the guest checks the real memory map).
RESERVED_MIB = 3

CFLAGS = (
    "-m32",
    "-march=i686",
    "-std=gnu11",
    "-ffreestanding",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-mgeneral-regs-only",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
)
LDFLAGS = (
    "-m32",
    "-nostdlib",
    "-no-pie",
    "-static",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,--no-warn-rwx-segments",
)


class GuestMode(StrEnum):
    PACED = "paced"
    CPU = "cpu"


class GuestError(Exception):
    """Base of this module's errors."""


class GuestBuildError(GuestError):
    def __init__(self, command: list[str], returncode: int, output: str) -> None:
        super().__init__(f"guest build failed rc={returncode}: {' '.join(command)}\n{output}")
        self.command = command
        self.returncode = returncode
        self.output = output


class GuestSpecError(GuestError, ValueError):
    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"invalid guest spec {field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class GuestSerialError(GuestError, ValueError):
    def __init__(self, line: str, reason: str) -> None:
        super().__init__(f"unparsable guest line ({reason}): {line!r}")
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class GuestSpec:
    """What one lab guest does. ``work_passes`` None means the guest default."""

    name: str
    memory_mib: int
    working_set_mib: int
    dirty_rate_mibps: float
    mode: GuestMode = GuestMode.PACED
    fill_mib: int = 0
    work_passes: int | None = None

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise GuestSpecError("name", self.name, "use letters, digits, '-', '_' or '.'")
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise GuestSpecError(
                "memory_mib", self.memory_mib, f"must be {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}"
            )
        if self.working_set_mib < 0 or self.fill_mib < 0:
            raise GuestSpecError("working_set_mib", self.working_set_mib, "must be >= 0")
        if self.working_set_mib + self.fill_mib > self.memory_mib - RESERVED_MIB:
            raise GuestSpecError(
                "fill_mib",
                self.fill_mib,
                f"working set plus fill must fit in memory_mib - {RESERVED_MIB}",
            )
        if not 0 <= self.dirty_rate_mibps <= MAX_RATE_MIBPS:
            raise GuestSpecError(
                "dirty_rate_mibps", self.dirty_rate_mibps, f"must be 0..{MAX_RATE_MIBPS}"
            )
        if self.dirty_rate_mibps > 0 and self.working_set_mib == 0:
            raise GuestSpecError("working_set_mib", 0, "a dirty rate needs a working set")
        if not isinstance(self.mode, GuestMode):
            object.__setattr__(self, "mode", GuestMode(self.mode))
        if self.work_passes is not None and not 1 <= self.work_passes <= MAX_WORK:
            raise GuestSpecError("work_passes", self.work_passes, f"must be 1..{MAX_WORK}")

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024 * 1024


def guest_cmdline(spec: GuestSpec) -> str:
    """The kernel command line that makes the guest behave as ``spec`` says."""
    rate = f"{spec.dirty_rate_mibps:.3f}".rstrip("0").rstrip(".")
    parts = [
        f"ws={spec.working_set_mib}",
        f"rate={rate}",
        f"mode={spec.mode.value}",
        f"fill={spec.fill_mib}",
    ]
    if spec.work_passes is not None:
        parts.append(f"work={spec.work_passes}")
    parts.append(f"name={spec.name}")
    return " ".join(parts)


def _source_digest(compiler: str) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode())
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(" ".join((compiler, *CFLAGS, *LDFLAGS)).encode())
    return digest.hexdigest()[:16]


def _run(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestBuildError(command, proc.returncode, proc.stdout + proc.stderr)


def build_guest(out_dir: Path, compiler: str = "gcc") -> Path:
    """Compile the guest into ``out_dir`` (cached by a hash of the sources)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    elf = out_dir / f"hmguest-{_source_digest(compiler)}.elf"
    if elf.exists():
        return elf
    with tempfile.TemporaryDirectory(prefix="hmguest-build-", dir=out_dir) as tmp:
        work = Path(tmp)
        objects = []
        for name in ("boot.S", "guest.c"):
            obj = work / (name.rsplit(".", 1)[0] + ".o")
            _run([compiler, *CFLAGS, "-c", str(SOURCE_DIR / name), "-o", str(obj)])
            objects.append(str(obj))
        linked = work / "hmguest.elf"
        _run(
            [
                compiler,
                *LDFLAGS,
                "-T",
                str(SOURCE_DIR / "guest.ld"),
                *objects,
                "-lgcc",
                "-o",
                str(linked),
            ]
        )
        # Atomic: concurrent builds of the same sources agree on the result.
        os.replace(linked, elf)
    LOG.info("built lab guest elf=%s", elf)
    return elf


def have_toolchain(compiler: str = "gcc") -> bool:
    return shutil.which(compiler) is not None


@dataclass(frozen=True)
class GuestReady:
    mem_mib: int
    ws_mib: int
    rate_mibps: float
    mode: GuestMode
    fill_mib: int
    work: int
    tsc_khz: int
    fill_ms: int
    boot_ms: int
    name: str | None


@dataclass(frozen=True)
class GuestProgress:
    t_s: float
    dirtied_pages: int
    dirtied_mib: float
    rate_mibps: float
    busy_pct: float
    ws_mib: int
    mode: GuestMode


@dataclass(frozen=True)
class GuestFailure:
    reason: str
    details: dict[str, str]


GuestEvent = GuestReady | GuestProgress | GuestFailure


def _fields(line: str) -> dict[str, str] | None:
    # The prefix may follow other output on the same line (firmware text).
    start = line.find(LINE_PREFIX + " event=")
    if start < 0:
        return None
    fields: dict[str, str] = {}
    for word in line[start + len(LINE_PREFIX) :].split():
        key, sep, value = word.partition("=")
        if not sep:
            raise GuestSerialError(line, f"not key=value: {word!r}")
        fields[key] = value
    return fields


def parse_serial_line(line: str) -> GuestEvent | None:
    """One serial line as an event; None for other output and ``boot``."""
    fields = _fields(line)
    if fields is None:
        return None
    event = fields.get("event")
    try:
        if event == "ready":
            return GuestReady(
                mem_mib=int(fields["mem_mib"]),
                ws_mib=int(fields["ws_mib"]),
                rate_mibps=float(fields["rate_mibps"]),
                mode=GuestMode(fields["mode"]),
                fill_mib=int(fields["fill_mib"]),
                work=int(fields["work"]),
                tsc_khz=int(fields["tsc_khz"]),
                fill_ms=int(fields["fill_ms"]),
                boot_ms=int(fields["boot_ms"]),
                name=fields.get("name"),
            )
        if event == "progress":
            return GuestProgress(
                t_s=float(fields["t"]),
                dirtied_pages=int(fields["dirtied_pages"]),
                dirtied_mib=float(fields["dirtied_mib"]),
                rate_mibps=float(fields["rate_mibps"]),
                busy_pct=float(fields["busy_pct"]),
                ws_mib=int(fields["ws_mib"]),
                mode=GuestMode(fields["mode"]),
            )
        if event == "error":
            details = {k: v for k, v in fields.items() if k not in ("event", "reason")}
            return GuestFailure(reason=fields.get("reason", "unknown"), details=details)
    except (KeyError, ValueError) as exc:
        raise GuestSerialError(line, f"bad or missing field: {exc}") from exc
    if event == "boot":
        return None
    raise GuestSerialError(line, f"unknown event {event!r}")


def parse_serial(text: str) -> list[GuestEvent]:
    """Every event in a serial log, in order; a torn last line is skipped."""
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]
    events = []
    for line in lines:
        event = parse_serial_line(line)
        if event is not None:
            events.append(event)
    return events
