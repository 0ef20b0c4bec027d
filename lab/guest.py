"""The lab guest: a tiny multiboot kernel whose memory behaviour is known exactly.

The sources live in ``lab/guest_src/`` (``boot.S``, ``guest.c``, ``guest.ld``);
:func:`build_guest` compiles them with ``gcc -m32 -ffreestanding`` into a
32-bit multiboot ELF that QEMU boots with ``-kernel`` (libvirt ``<kernel>``)
and parameterises through the kernel command line (``-append`` /
``<cmdline>``), built by :func:`guest_cmdline` from a :class:`GuestSpec`.

Command line (all optional, space separated)::

    ws=<MiB>        working set written at the rate (default 64)
    rate=<MiB/s>    target write rate, up to three decimals (default 0)
    mode=paced|cpu  paced: a fixed rate, rate/100 pages per 10 ms tick, one
                    store per page, so vCPU throttling barely slows it;
                    cpu: each page rewritten whole `work` times, as fast as
                    the vCPU allows up to the rate, owing at most 100 ms of
                    pages, so throttling slows it in proportion (default paced)
    pattern=seq|random|hotcold|bursty
                    which pages the writes go to (default seq): seq walks the
                    working set in address order; random picks pages
                    uniformly (xorshift32); hotcold sends hot_pct % of the
                    writes to the first hot_ws_pct % of the set and the rest
                    to the others, each part uniformly; bursty walks like seq,
                    writing at the rate for on_ms, then idling for off_ms.
                    Any pattern combines with either mode.
    hot_pct=<0..100> hot_ws_pct=<1..100>   hotcold only (defaults 90, 10)
    on_ms=<ms> off_ms=<ms>                 bursty only, 10..3600000 (1000 each)
    seed=<u32>      random and hotcold's seed (default: a hash of the name)
    fill=<MiB>|max  static non-zero data written once at boot (default 0)
    work=<passes>   whole-page passes per page in cpu mode (default 3)
    verify=0|1      check all of fill and working set continuously (default 1)
    verify_budget_pct=<1..50>  the checker's share of the vCPU (default 5)
    corrupt_after_s=<s>  test only: zero one page (the middle fill page, else
                    the middle working-set page) once, that many seconds
                    after ready, behind the record's back: a lost page
    name=<text>     echoed in the ready line

Fill and working set sit side by side above the kernel (from 2 MiB) in the
usable RAM of the multiboot memory map; if they do not fit the guest prints
an error line and halts. Both are written with non-zero data at boot.

Integrity: every page's content follows from what the guest wrote. Fill
pages hold a word derived from their frame number in every word; paced
writes change a page's first word (a walk writes one word per pass, picked
pages' words are recorded); cpu-mode pages hold their recorded word
throughout. A background checker in the same tick handler as the writer (one
vCPU, interrupts off, so it never sees a page between its write and its
record) sweeps all of fill and working set: per page the first word where
paced writes land and one sample word that moves on every sweep, 16 pages
summed at once against the sum they should have, a differing block then
page by page. A lost, zeroed, stale or misplaced page shows in the next
sweep; a change elsewhere in a page once the sample reaches it. Where the
guest's instructions are emulated (this lab: about 1.5 us each) reading is
not cheap (about 10 us a page), so the checker takes at most
``verify_budget_pct`` of the vCPU's time (what it overspends in one tick is
owed) and at most one sweep a second: at 5 % a sweep of 16 MiB takes 1 s,
48 MiB 1.2 to 2.4 s, 72 MiB 2 to 3 s, 150 MiB about 5 to 8 s.
The bookkeeping (a word per 16 pages, a bit per page, and for cpu, random
and hotcold a word per working-set page) sits between the kernel and 2 MiB
when it fits (below :data:`META_GAP_KIB`), else before the fill. The
console is an output-only file in the lab's domains, so there is no "verify
now" command: the continuous sweep is the check.

Serial (COM1) lines, one event per line, ``hmguest`` then ``key=value``
pairs; new keys may be added, existing ones keep their meaning::

    hmguest event=boot
    hmguest event=ready mem_mib=256 ws_mib=128 rate_mibps=40.000 mode=paced
        fill_mib=64 work=3 tsc_khz=2445417 region_base=0x00200000
        region_end=0x0ffe0000 fill_ms=612 boot_ms=2474 pattern=hotcold
        seed=2166136261 hot_pct=90 hot_ws_pct=10 duty_pct=100.0 verify=on
        verify_budget_pct=5 meta_base=0x0010a000 meta_kib=196
        [corrupt_after_s=5] [name=vm1]
    hmguest event=progress t=12.04 dirtied_pages=123321 dirtied_mib=481.7
        rate_mibps=40.000 busy_pct=6.4 ws_mib=128 mode=paced pattern=hotcold
        distinct_pages=5012 distinct_mibps=19.578 cfg_rate_mibps=40.000
        on_pct=100.0 verify_pct=2.1
    hmguest event=verify t=12.31 sweeps=12 checked_pages=589824 pages=49152
        sweep_ms=1000 word=101 mismatched_pages=0 sweep_mismatched=0
        [bad_pfns=0x00004a00,0x00004a01]
    hmguest event=corrupt t=5.00 pfn=0x00002200
    hmguest event=error reason=no_memory need_mib=256 avail_mib=253

(each on one line.) ``ready``: ``seed`` for random and hotcold, ``hot_pct``
and ``hot_ws_pct`` for hotcold, ``on_ms`` and ``off_ms`` for bursty;
``duty_pct`` the configured share of time spent writing (100 but for
bursty); ``verify_budget_pct`` the checker's share of the vCPU.
``progress``: ``t`` is seconds since ready, ``rate_mibps`` the writes
achieved over the last report interval (about 1 s), rewrites included;
``distinct_pages`` the distinct working-set pages written in that interval
and ``distinct_mibps`` those per second (below ``rate_mibps`` where pages are
rewritten within the interval: random, hotcold, or a set smaller than a
second of writes); ``cfg_rate_mibps`` the configured rate (bursty: while
writing); ``on_pct`` the share of the interval in a writing phase;
``busy_pct`` the share of that interval the writer worked rather than
halted, by its own clock (descheduled time inside the work counts as busy),
``verify_pct`` the checker's share. Older guests' lines lack the fields
after ``mode``. ``verify``, after each full sweep: ``sweeps`` completed,
``checked_pages`` in all, ``pages`` per sweep, ``sweep_ms`` its length,
``word`` its sample word, ``mismatched_pages`` the
distinct pages ever found not to hold what the guest wrote (cumulative since
boot), ``sweep_mismatched`` those in the sweep just ended, ``bad_pfns`` the
first few mismatched page frame numbers. The guest's bookkeeping (random and
hotcold: a word and a bit per page written) is written too, and not counted
in ``distinct_pages``. ``error`` reasons: ``no_memory``, ``no_memory_map``,
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
from typing import Any

LOG = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "guest_src"
SOURCES = ("boot.S", "guest.c", "guest.ld")
LINE_PREFIX = "hmguest"

MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 2048
MAX_RATE_MIBPS = 2000.0
MAX_WORK = 100000
MIN_PHASE_MS = 10
MAX_PHASE_MS = 3_600_000
MAX_CORRUPT_AFTER_S = 86400
MAX_SEED = 2**32 - 1
MAX_VERIFY_BUDGET_PCT = 50
# Below the guest's regions: 2 MiB for BIOS, kernel and boot data, and the
# firmware's tables at the top of RAM. Fill plus working set must fit in the
# rest (the guest checks the real memory map).
RESERVED_MIB = 3
# The guest's record of what it wrote fits between its kernel and 2 MiB up to
# this size (a margin below the real gap); beyond it, it comes out of the
# region that holds fill and working set.
META_GAP_KIB = 896
DEFAULT_PHASE_MS = 1000

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


class GuestPattern(StrEnum):
    """Which pages a guest writes (``mode`` says how it writes each page)."""

    SEQ = "seq"
    RANDOM = "random"
    HOTCOLD = "hotcold"
    BURSTY = "bursty"

    @property
    def picks_pages(self) -> bool:
        """random and hotcold pick their pages; seq and bursty walk the set in order."""
        return self in (GuestPattern.RANDOM, GuestPattern.HOTCOLD)


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


def meta_bytes(
    working_set_mib: int, checked_mib: int, pattern: GuestPattern, mode: GuestMode
) -> int:
    """Bytes of the guest's bookkeeping: block sums, mismatch bitmap, record, written map."""

    def pages_of(size: int) -> int:
        return -(-size // 4096) * 4096

    ws_pages, checked = working_set_mib * 256, checked_mib * 256
    size = pages_of(checked // 16 * 4) + pages_of(-(-checked // 8))
    if pattern.picks_pages or mode is GuestMode.CPU:
        size += pages_of(ws_pages * 4)
    if pattern.picks_pages:
        size += pages_of(-(-ws_pages // 32) * 4)
    return size


@dataclass(frozen=True)
class GuestSpec:
    """What one lab guest does. ``work_passes`` None means the guest default.

    ``hot_pct``/``hot_ws_pct`` (hotcold), ``on_ms``/``off_ms`` (bursty) and
    ``seed`` (random, hotcold) are None for the guest's defaults and refused
    with other patterns. ``corrupt_after_s`` is for tests of the checker only.
    """

    name: str
    memory_mib: int
    working_set_mib: int
    dirty_rate_mibps: float
    mode: GuestMode = GuestMode.PACED
    fill_mib: int = 0
    work_passes: int | None = None
    pattern: GuestPattern = GuestPattern.SEQ
    hot_pct: int | None = None
    hot_ws_pct: int | None = None
    on_ms: int | None = None
    off_ms: int | None = None
    seed: int | None = None
    verify: bool = True
    verify_budget_pct: int | None = None
    corrupt_after_s: int | None = None

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise GuestSpecError("name", self.name, "use letters, digits, '-', '_' or '.'")
        for enum, field in ((GuestMode, "mode"), (GuestPattern, "pattern")):
            value = getattr(self, field)
            if not isinstance(value, enum):
                try:
                    object.__setattr__(self, field, enum(value))
                except ValueError:
                    known = ", ".join(m.value for m in enum)
                    raise GuestSpecError(field, value, f"must be one of {known}") from None
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise GuestSpecError(
                "memory_mib", self.memory_mib, f"must be {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}"
            )
        if self.working_set_mib < 0 or self.fill_mib < 0:
            raise GuestSpecError("working_set_mib", self.working_set_mib, "must be >= 0")
        if self.working_set_mib + self.fill_mib + self.meta_overflow_mib > (
            self.memory_mib - RESERVED_MIB
        ):
            raise GuestSpecError(
                "fill_mib",
                self.fill_mib,
                f"working set plus fill must fit in memory_mib - {RESERVED_MIB}"
                + (
                    f" - {self.meta_overflow_mib} (the guest's record)"
                    if self.meta_overflow_mib
                    else ""
                ),
            )
        if not 0 <= self.dirty_rate_mibps <= MAX_RATE_MIBPS:
            raise GuestSpecError(
                "dirty_rate_mibps", self.dirty_rate_mibps, f"must be 0..{MAX_RATE_MIBPS}"
            )
        if self.dirty_rate_mibps > 0 and self.working_set_mib == 0:
            raise GuestSpecError("working_set_mib", 0, "a dirty rate needs a working set")
        if self.work_passes is not None and not 1 <= self.work_passes <= MAX_WORK:
            raise GuestSpecError("work_passes", self.work_passes, f"must be 1..{MAX_WORK}")
        if not isinstance(self.verify, bool):
            raise GuestSpecError("verify", self.verify, "must be true or false")
        if self.verify_budget_pct is not None and not (
            self.verify and 1 <= self.verify_budget_pct <= MAX_VERIFY_BUDGET_PCT
        ):
            raise GuestSpecError(
                "verify_budget_pct",
                self.verify_budget_pct,
                f"must be 1..{MAX_VERIFY_BUDGET_PCT}, with verify",
            )
        self._check_pattern()
        if self.corrupt_after_s is not None:
            if not 1 <= self.corrupt_after_s <= MAX_CORRUPT_AFTER_S:
                raise GuestSpecError(
                    "corrupt_after_s", self.corrupt_after_s, f"must be 1..{MAX_CORRUPT_AFTER_S}"
                )
            if not self.verify or self.working_set_mib + self.fill_mib == 0:
                raise GuestSpecError(
                    "corrupt_after_s", self.corrupt_after_s, "needs verify and some memory"
                )

    def _check_pattern(self) -> None:
        only = {
            "hot_pct": GuestPattern.HOTCOLD,
            "hot_ws_pct": GuestPattern.HOTCOLD,
            "on_ms": GuestPattern.BURSTY,
            "off_ms": GuestPattern.BURSTY,
        }
        for field, pattern in only.items():
            if getattr(self, field) is not None and self.pattern is not pattern:
                raise GuestSpecError(field, getattr(self, field), f"only for pattern {pattern}")
        if self.seed is not None and not self.pattern.picks_pages:
            raise GuestSpecError("seed", self.seed, "only for patterns random and hotcold")
        ranges = {
            "hot_pct": (0, 100),
            "hot_ws_pct": (1, 100),
            "on_ms": (MIN_PHASE_MS, MAX_PHASE_MS),
            "off_ms": (MIN_PHASE_MS, MAX_PHASE_MS),
            "seed": (0, MAX_SEED),
        }
        for field, (low, high) in ranges.items():
            value = getattr(self, field)
            if value is not None and not low <= value <= high:
                raise GuestSpecError(field, value, f"must be {low}..{high}")

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024 * 1024

    @property
    def meta_overflow_mib(self) -> int:
        """MiB the guest's record takes from fill and working set (0 when it fits below)."""
        size = meta_bytes(
            self.working_set_mib,
            self.memory_mib - RESERVED_MIB,
            GuestPattern(self.pattern),
            GuestMode(self.mode),
        )
        return 0 if size <= META_GAP_KIB * 1024 else -(-size // (1024 * 1024))

    @property
    def duty_pct(self) -> float:
        """The configured share of time spent writing (bursty: on / (on + off))."""
        if self.pattern is not GuestPattern.BURSTY:
            return 100.0
        on = self.on_ms or DEFAULT_PHASE_MS
        return 100.0 * on / (on + (self.off_ms or DEFAULT_PHASE_MS))


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
    if spec.pattern is not GuestPattern.SEQ:
        parts.append(f"pattern={spec.pattern.value}")
    keys = ("hot_pct", "hot_ws_pct", "on_ms", "off_ms", "seed", "verify_budget_pct")
    for key in (*keys, "corrupt_after_s"):
        value = getattr(spec, key)
        if value is not None:
            parts.append(f"{key}={value}")
    if not spec.verify:
        parts.append("verify=0")
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
    """The ready line. Fields after ``name`` are absent from older guests' lines:
    their defaults say what those guests did (a sequential walk, no checking)."""

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
    pattern: GuestPattern = GuestPattern.SEQ
    seed: int | None = None
    hot_pct: int | None = None
    hot_ws_pct: int | None = None
    on_ms: int | None = None
    off_ms: int | None = None
    duty_pct: float = 100.0
    verify: bool = False
    verify_budget_pct: int | None = None
    corrupt_after_s: int | None = None


@dataclass(frozen=True)
class GuestProgress:
    """A progress line. The fields after ``mode`` are None (pattern: seq) in older
    guests' lines."""

    t_s: float
    dirtied_pages: int
    dirtied_mib: float
    rate_mibps: float
    busy_pct: float
    ws_mib: int
    mode: GuestMode
    pattern: GuestPattern = GuestPattern.SEQ
    distinct_pages: int | None = None
    distinct_mibps: float | None = None
    cfg_rate_mibps: float | None = None
    on_pct: float | None = None
    verify_pct: float | None = None


@dataclass(frozen=True)
class GuestVerify:
    """A full sweep of the guest's checker ended: its figures since boot."""

    t_s: float
    sweeps: int
    checked_pages: int
    pages: int
    sweep_ms: int
    mismatched_pages: int
    sweep_mismatched: int
    bad_pfns: tuple[int, ...] = ()
    word: int | None = None


@dataclass(frozen=True)
class GuestCorruption:
    """The test-only corruption (``corrupt_after_s``) changed this page frame."""

    t_s: float
    pfn: int


@dataclass(frozen=True)
class GuestFailure:
    reason: str
    details: dict[str, str]


GuestEvent = GuestReady | GuestProgress | GuestVerify | GuestCorruption | GuestFailure


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


def _opt(fields: dict[str, str], key: str, kind: type[int] | type[float]) -> Any:
    value = fields.get(key)
    return None if value is None else kind(value)


def _ready(f: dict[str, str]) -> GuestReady:
    return GuestReady(
        mem_mib=int(f["mem_mib"]),
        ws_mib=int(f["ws_mib"]),
        rate_mibps=float(f["rate_mibps"]),
        mode=GuestMode(f["mode"]),
        fill_mib=int(f["fill_mib"]),
        work=int(f["work"]),
        tsc_khz=int(f["tsc_khz"]),
        fill_ms=int(f["fill_ms"]),
        boot_ms=int(f["boot_ms"]),
        name=f.get("name"),
        pattern=GuestPattern(f.get("pattern", GuestPattern.SEQ.value)),
        seed=_opt(f, "seed", int),
        hot_pct=_opt(f, "hot_pct", int),
        hot_ws_pct=_opt(f, "hot_ws_pct", int),
        on_ms=_opt(f, "on_ms", int),
        off_ms=_opt(f, "off_ms", int),
        duty_pct=float(f.get("duty_pct", "100")),
        verify=f.get("verify") == "on",
        verify_budget_pct=_opt(f, "verify_budget_pct", int),
        corrupt_after_s=_opt(f, "corrupt_after_s", int),
    )


def _progress(f: dict[str, str]) -> GuestProgress:
    return GuestProgress(
        t_s=float(f["t"]),
        dirtied_pages=int(f["dirtied_pages"]),
        dirtied_mib=float(f["dirtied_mib"]),
        rate_mibps=float(f["rate_mibps"]),
        busy_pct=float(f["busy_pct"]),
        ws_mib=int(f["ws_mib"]),
        mode=GuestMode(f["mode"]),
        pattern=GuestPattern(f.get("pattern", GuestPattern.SEQ.value)),
        distinct_pages=_opt(f, "distinct_pages", int),
        distinct_mibps=_opt(f, "distinct_mibps", float),
        cfg_rate_mibps=_opt(f, "cfg_rate_mibps", float),
        on_pct=_opt(f, "on_pct", float),
        verify_pct=_opt(f, "verify_pct", float),
    )


def _verify(f: dict[str, str]) -> GuestVerify:
    bad = f.get("bad_pfns", "")
    return GuestVerify(
        t_s=float(f["t"]),
        sweeps=int(f["sweeps"]),
        checked_pages=int(f["checked_pages"]),
        pages=int(f["pages"]),
        sweep_ms=int(f["sweep_ms"]),
        mismatched_pages=int(f["mismatched_pages"]),
        sweep_mismatched=int(f["sweep_mismatched"]),
        bad_pfns=tuple(int(p, 16) for p in bad.split(",") if p),
        word=_opt(f, "word", int),
    )


def parse_serial_line(line: str) -> GuestEvent | None:
    """One serial line as an event; None for other output and ``boot``."""
    fields = _fields(line)
    if fields is None:
        return None
    event = fields.get("event")
    try:
        if event == "ready":
            return _ready(fields)
        if event == "progress":
            return _progress(fields)
        if event == "verify":
            return _verify(fields)
        if event == "corrupt":
            return GuestCorruption(t_s=float(fields["t"]), pfn=int(fields["pfn"], 16))
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
