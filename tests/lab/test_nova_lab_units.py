"""The lab guest as a Nova instance's domain: its uuid and Nova's metadata, as the agent reads them."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import libvirt
import pytest

from hostmaint.agent.inventory import parse_domain_xml
from hostmaint.agent.types import NovaInstance
from hostmaint.lab import domains


def _config(uuid: str = "", nova: domains.NovaMetadata | None = None) -> domains.DomainConfig:
    return domains.DomainConfig(
        name="hm-unit-vm",
        memory_mib=256,
        kernel=Path("/nonexistent/kernel.elf"),
        cmdline="ws=8 rate=1",
        serial_path=Path("/nonexistent/serial.log"),
        accel=domains.Accel.KVM,
        cpu_model="",
        uuid=uuid,
        nova=nova,
    )


def test_the_agent_reads_the_instance_a_lab_guest_stands_for() -> None:
    server_id = str(uuid4())
    nova = domains.NovaMetadata("web-1", "hm-256", "p" * 32, "u" * 32)
    parsed = parse_domain_xml(domains.domain_xml(_config(uuid=server_id, nova=nova)))
    assert parsed.uuid == server_id
    assert parsed.nova == NovaInstance(server_id, "web-1", "hm-256", "p" * 32, "u" * 32)


def test_a_plain_lab_guest_has_no_nova_instance() -> None:
    parsed = parse_domain_xml(domains.domain_xml(_config()))
    assert parsed.nova is None
    assert parsed.uuid == ""


def test_libvirt_keeps_the_uuid_and_nova_metadata() -> None:
    """libvirt's own parser (test:///default, no daemon) accepts the XML and returns both."""
    server_id = str(uuid4())
    nova = domains.NovaMetadata("web-2", "hm-128", "a" * 32, "b" * 32)
    conn = libvirt.open("test:///default")
    if conn is None:
        pytest.skip("libvirt's test driver is not available")
    try:
        dom = conn.defineXML(domains.domain_xml(_config(uuid=server_id, nova=nova)))
        try:
            parsed = parse_domain_xml(dom.XMLDesc(0))
        finally:
            dom.undefine()
    finally:
        conn.close()
    assert parsed.uuid == server_id
    assert parsed.nova == NovaInstance(server_id, "web-2", "hm-128", "a" * 32, "b" * 32)
