"""`hostmaint report DRAIN_ID --html FILE` against a running coordinator, looked at in Chromium.

A drain of a simulated cloud runs to its end through a real coordinator; the
CLI writes its timeline; headless Chromium (Debian's `chromium`) loads the
page, dumps its DOM and takes a screenshot, and the test checks what is drawn.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hostmaint.coordinator import cli
from hostmaint.protos import coordinator_pb2 as cpb
from hostmaint.protos import coordinator_pb2_grpc
from tests.coordinator.loadcluster import (
    Layout,
    drain_policy,
    follow_drain,
    simulated,
)

VMS = 4
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def drained(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(the coordinator's address, the id of a drain that completed there)."""
    layout = Layout.build(1, VMS, 2)
    with simulated(
        tmp_path, layout, time_scale=0.2, poll_interval_s=0.05, max_parallel_per_source=2
    ) as coordinator:
        address = f"127.0.0.1:{coordinator.port}"
        with grpc.insecure_channel(address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            result = follow_drain(stub, "src000", drain_policy(layout.targets), timeout_s=120)
        assert result.final is not None and result.final.state == cpb.DRAIN_STATE_COMPLETED
        yield address, result.drain_id


def write_report(drained: tuple[str, str], page: Path) -> int:
    address, drain_id = drained
    return cli.main(["--coordinator", address, "report", drain_id, "--html", str(page)])


def test_the_report_draws_each_vm_planned_and_actual(
    drained: tuple[str, str], tmp_path: Path
) -> None:
    page = tmp_path / "drain.html"
    assert write_report(drained, page) == 0
    html = page.read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in html and "<link" not in html  # nothing to fetch
    assert html.count('class="bar planned"') == VMS
    assert html.count('class="bar actual completed"') == VMS


def test_an_unknown_drain_is_not_found(drained: tuple[str, str], tmp_path: Path) -> None:
    address, _ = drained
    unknown = "00000000-0000-4000-8000-000000000000"
    page = tmp_path / "none.html"
    assert cli.main(["--coordinator", address, "report", unknown, "--html", str(page)]) == 3
    assert not page.exists()


def _png_rgb(png: bytes) -> tuple[int, int, set[tuple[int, int, int]]]:
    """Width, height and the colours of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = data
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    previous, colours = bytearray(stride), set()
    for row in range(height):
        kind, line = (
            raw[row * (stride + 1)],
            bytearray(raw[row * (stride + 1) + 1 : (row + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = previous[i]
            c = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        colours.update((line[k], line[k + 1], line[k + 2]) for k in range(0, stride, bpp))
        previous = line
    return width, height, colours


@pytest.mark.chromium
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package chromium)")
def test_chromium_draws_the_bars_the_link_and_the_table(
    drained: tuple[str, str], tmp_path: Path
) -> None:
    page = tmp_path / "drain.html"
    assert write_report(drained, page) == 0
    assert CHROMIUM is not None
    base = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,900",
        "--hide-scrollbars",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert dom.count('class="bar planned"') == VMS
    assert dom.count('class="bar actual completed"') == VMS
    assert dom.count('class="switchover"') == VMS
    assert '<polyline class="link"' in dom
    assert dom.count('<tr class="vm">') == VMS

    shot = tmp_path / "drain.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    width, height, colours = _png_rgb(shot.read_bytes())
    assert (width, height) == (1200, 900)
    # not a blank page: the completed bars' green, the planned bars' grey, the switch-overs
    assert {(0x2E, 0x7D, 0x32), (0xC9, 0xCE, 0xD6), (0, 0, 0)} <= colours
    assert len(colours) > 32
