"""OpenStack's packaging conventions: bindep.txt is the one list of system
packages (scripts/bootstrap.sh installs it), and the reno release notes are
well-formed (`tox -e releasenotes-lint` runs reno's own lint)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "releasenotes" / "notes"
# name [selector ...]: Debian package names, bindep's platform and profile selectors.
BINDEP_LINE = re.compile(r"^([a-z0-9][a-z0-9+.-]+)(?: \[((?:!?[a-z0-9:_-]+ ?)+)\])?$")
NOTE_NAME = re.compile(r"^[a-z0-9-]+-[0-9a-f]{16}\.yaml$")


def bindep_entries() -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for line in (ROOT / "bindep.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = BINDEP_LINE.match(line)
        assert match, f"bindep.txt: {line!r} is not `package [selectors]`"
        assert match[1] not in entries, f"bindep.txt lists {match[1]} twice"
        entries[match[1]] = (match[2] or "").split()
    return entries


def test_bootstrap_installs_what_bindep_lists() -> None:
    entries = bindep_entries()
    assert all("platform:dpkg" in selectors for selectors in entries.values())
    listed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "bootstrap.sh"), "--list-system-packages"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listed == list(entries)


def sections() -> set[str]:
    config = yaml.safe_load((ROOT / "releasenotes" / "config.yaml").read_text())
    return {name for name, _title in config["sections"]} | {"prelude"}


def test_release_notes_are_well_formed() -> None:
    notes = sorted(NOTES.iterdir())
    assert notes, "no release notes"
    allowed = sections()
    for note in notes:
        assert NOTE_NAME.match(note.name), f"{note.name}: not reno's SLUG-UID.yaml"
        body = yaml.safe_load(note.read_text())
        assert isinstance(body, dict) and body, f"{note.name}: not a mapping of sections"
        assert set(body) <= allowed, f"{note.name}: unknown sections {set(body) - allowed}"
        for section, value in body.items():
            if section == "prelude":
                assert isinstance(value, str) and value.strip(), f"{note.name}: empty prelude"
            else:
                assert isinstance(value, list) and value, f"{note.name}: {section} is no list"
                assert all(isinstance(v, str) and v.strip() for v in value), note.name
