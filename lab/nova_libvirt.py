"""Nova's own libvirt driver on the lab's hosts, inside the one-process Nova.

Runs inside Nova's virtualenv, imported by ``lab/nova_server.py --driver
libvirt``. Each nova-compute service runs ``nova.virt.libvirt.LibvirtDriver``
unchanged, connected to the libvirtd of the lab host of the same name
(``[libvirt] connection_uri``, set before that service starts: the driver
reads it once, when it is built). Servers are booted through Nova's API and
spawned by the driver itself; live migrations, their monitor (downtime
steps, completion timeout and its action, progress in the migration record,
force-complete, abort, the post-copy switch) and cold migrations are Nova's
own code. No method of the driver is overridden; one attribute is changed
(see "libvirt's storage check" below).

What differs from a deployment is configuration and the test harness, each
for a reason these machines impose:

- **The harness's guards are lifted.** Nova's functional-test base forbids
  what a unit test must not touch: ``os.uname`` and ``psutil.net_if_addrs``
  (host inspection), reads below ``/sys`` (``builtins.open``,
  ``os.path.isdir``, ``os.listdir``, ``glob``), libvirt's event loop
  (``Host._init_events``) and the privsep helper. Here the hosts are real,
  so the originals are put back, and privileged calls run in this process
  (it runs as root, as the lab does) instead of a privsep daemon.
- **Images** come from the harness's in-memory Glance: one image holds the
  lab guest's multiboot kernel (``aki``), and one raw image per guest kind
  (a small zero disk) names it as ``kernel_id`` and carries the guest's
  parameters as ``os_command_line``; Nova then boots it as a direct kernel
  boot, as it does for any AMI-style image. The guest has no ACPI, so the
  image says ``os_shutdown_timeout = 0``: Nova powers it off at once.
- **No network.** Servers are booted with ``networks='none'``: there is no
  Neutron or Open vSwitch to plug ports into.
- **One process, several hosts.** Each host keeps its compute node's uuid
  in a file of its own; here the services share a process, so each one's
  uuid is derived from its host name while it starts, as Nova's own
  multi-host functional tests do. ``CONF.host`` is one value for the whole
  process: the host of the compute service started last. Nova compares it
  with an instance's host in a few places; the one a test meets is a cold
  migration's confirm, which undefines the source's domain only where the
  instance's new host differs from ``CONF.host``, so the cold migration test
  moves its server to another host than that one.
- **Shared storage.** All compute services share one ``instances_path``, as
  on NFS: live migrations are not block migrations, and cold migrations
  copy the disk within it. (The services share ``my_ip`` too, so Nova's
  check of a shared instance path succeeds without SSH.)
- **libvirt's storage check.** libvirt refuses a live migration whose
  disks are on a local filesystem unless the caller says the storage is
  shared (``VIR_MIGRATE_UNSAFE``): it knows shared storage only by filesystem
  type (NFS, GFS2, CephFS, ...), none of which these machines' kernel can
  mount. The flag is added to the migration flags the driver parsed from
  nova.conf, once, after the driver starts (``_accept_lab_storage``); no
  method is replaced.
- **Peer-to-peer addresses.** ``[libvirt] live_migration_uri`` (a ``%s``
  template filled with the destination's name) points at the destination
  lab daemon's UNIX socket, and each lab daemon's ``migration_host``
  (qemu.conf) gives its own lab address for the migration stream, so Nova
  needs no ``live_migration_inbound_addr`` (one value per process here).
- **CPU.** ``cpu_mode = custom`` with the lab's CPU model and ``-svm`` (the
  lab offers guests no nested virtualisation), or ``cpu_mode = none`` where
  the lab found no named model usable (its own guests then run QEMU's
  default model too); ``hw_machine_type = x86_64=pc``, the machine the lab
  guest is written for. Where the lab runs nested (KVM inside a VM), the
  host CPU that libvirt reports has features KVM does not offer its guests,
  so Nova's check that the destination can run the *source host's* CPU
  (made when the instance has no CPU model) fails between identical hosts;
  the lab then sets ``[workarounds] skip_cpu_compare_on_dest``, Nova's own
  switch for that check (``"skip_cpu_compare_on_dest": true``).

The host map is the JSON file given as ``--lab-config``::

    {"hosts": {"<lab host>": {"uri": "qemu+unix:///system?socket=..."}, ...},
     "live_migration_uri": "qemu+unix:///system?socket=.../%s/run/libvirt-sock",
     "instances_path": "/.../instances",
     "virt_type": "kvm", "cpu_model": "EPYC",
     "kernel": "/.../guest.elf",
     "images": [{"name": "hm-x-dirty", "os_command_line": "ws=48 rate=24 ..."}],
     "libvirt_python_dir": "<a folder holding libvirt.py and libvirtmod*.so>"}
"""

import builtins
import glob
import io
import json
import os
import uuid

DISK_BYTES = 1 << 20
KERNEL_IMAGE = "hostmaint-lab-guest-kernel"


def load(path):
    with open(path) as f:
        return json.load(f)


# The originals of what Nova's test base poisons, taken before it runs.
_ORIGINALS = {
    "os.uname": os.uname,
    "os.path.isdir": os.path.isdir,
    "os.listdir": os.listdir,
    "builtins.open": builtins.open,
    "glob.glob": glob.glob,
    "glob.iglob": glob.iglob,
}


def remember_originals():
    """Called before Nova's test base is set up: keeps what it will poison."""
    import psutil
    from nova.virt.libvirt import host

    _ORIGINALS["psutil.net_if_addrs"] = psutil.net_if_addrs
    _ORIGINALS["nova.virt.libvirt.host.Host._init_events"] = host.Host._init_events


def lift_guards(test):
    """Puts back what the test base poisoned, and runs privsep calls in this process."""
    import fixtures
    from nova.tests import fixtures as nova_fixtures

    for name, original in _ORIGINALS.items():
        test.useFixture(fixtures.MonkeyPatch(name, original))
    test.useFixture(nova_fixtures.PrivsepFixture())


def configure(test, config):
    """nova.conf for the lab: see the module docstring for each choice."""
    os.makedirs(config["instances_path"], exist_ok=True)
    test.flags(compute_driver="libvirt.LibvirtDriver")
    test.flags(instances_path=config["instances_path"], my_ip="127.0.0.1")
    test.flags(enabled=False, group="vnc")
    test.flags(enabled=False, group="spice")
    virt_type = config.get("virt_type", "kvm")
    test.flags(
        virt_type=virt_type,
        hw_machine_type=["x86_64=pc"],
        live_migration_uri=config["live_migration_uri"],
        group="libvirt",
    )
    if config.get("cpu_model"):
        extra = ["-svm"] if virt_type == "kvm" else []
        test.flags(
            cpu_mode="custom",
            cpu_models=[config["cpu_model"]],
            cpu_model_extra_flags=extra,
            group="libvirt",
        )
    else:
        # The lab found no named model usable here: its guests run QEMU's default.
        test.flags(cpu_mode="none", group="libvirt")
    if config.get("skip_cpu_compare_on_dest"):
        test.flags(skip_cpu_compare_on_dest=True, group="workarounds")


def start_computes(test, config, hosts):
    """One compute service a lab host, each driver connected to its host's daemon."""
    from unittest import mock

    first = None
    for name in hosts:
        test.flags(connection_uri=config["hosts"][name]["uri"], group="libvirt")
        node_uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.compute-node.hostmaint"))
        with mock.patch("nova.virt.node.get_local_node_uuid", return_value=node_uuid):
            compute = test._start_compute(name)
            compute.driver._host.get_node_uuid()  # kept by the driver from now on
        _accept_lab_storage(compute.driver)
        first = first or compute
    return first


def _accept_lab_storage(driver):
    """Adds VIR_MIGRATE_UNSAFE to the flags the driver parsed from nova.conf.

    The lab's instances path is one local filesystem that every lab host sees:
    shared storage in fact. libvirt recognises shared storage only by the
    filesystem's type (NFS, GFS2, CephFS, ...), and this kernel can mount none
    of them, so it would refuse every migration of a disk-backed server as
    unsafe. Nothing else about the migration changes.
    """
    import libvirt

    driver._live_migration_flags |= libvirt.VIR_MIGRATE_UNSAFE
    driver._block_migration_flags |= libvirt.VIR_MIGRATE_UNSAFE


def register_images(glance, config):
    """The lab guest's kernel and one bootable image a guest kind: {name: image id}."""
    with open(config["kernel"], "rb") as f:
        kernel = f.read()
    kernel_id = str(uuid.uuid4())
    glance.create(
        None,
        {
            "id": kernel_id,
            "name": KERNEL_IMAGE,
            "status": "active",
            "visibility": "public",
            "container_format": "aki",
            "disk_format": "aki",
            "size": len(kernel),
            "properties": {},
        },
        data=io.BytesIO(kernel),
    )
    ids = {KERNEL_IMAGE: kernel_id}
    for image in config.get("images", []):
        image_id = str(uuid.uuid4())
        glance.create(
            None,
            {
                "id": image_id,
                "name": image["name"],
                "status": "active",
                "visibility": "public",
                "container_format": "bare",
                "disk_format": "raw",
                "size": DISK_BYTES,
                "min_disk": 0,
                "min_ram": 0,
                "properties": {
                    "kernel_id": kernel_id,
                    "os_command_line": image["os_command_line"],
                    "architecture": "x86_64",
                    # The lab guest has no ACPI: power it off at once rather than
                    # after Nova's 60 s wait for a clean shutdown.
                    "os_shutdown_timeout": 0,
                },
            },
            data=io.BytesIO(bytes(DISK_BYTES)),
        )
        ids[image["name"]] = image_id
    return ids
