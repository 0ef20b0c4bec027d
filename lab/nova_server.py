"""A real Nova control plane in one process, serving its compute API on TCP.

Runs inside Nova's own virtualenv (``scripts/nova-venv.sh`` creates
``.venv-nova``), never the project's: Nova pins many libraries. It starts
Nova's API, conductor, scheduler, placement and one nova-compute service per
host named on the command line through Nova's functional-test fixtures, with
the per-server fake driver of ``nova_fakedriver.py`` (or, with ``--driver
libvirt --lab-config FILE``, Nova's own libvirt driver on the lab hosts of
the same names: see ``nova_libvirt.py``), and serves the API's WSGI
application on ``127.0.0.1:<port>`` with eventlet's WSGI server. ``--flag
GROUP.NAME=VALUE`` sets any nova.conf option.

    .venv-nova/bin/python lab/nova_server.py --port 0 --ready-file /tmp/nova.json \\
        host1 host2 host3

When the API answers it writes a JSON ready file (and prints one line
``NOVA READY {...}``) with the port, the hosts, the image ids of the fake
image service, the flavors, the start-up time and the RSS. Keystone is
stubbed: send ``X-Auth-User``, ``X-Auth-Project-Id`` and ``X-Roles``. Servers
are created through the API (an admin may pick the host with
``availability_zone='nova:<host>'``). SIGTERM or SIGINT stop every service.
"""

import argparse
import json
import logging
import os
import resource
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = "nova_fakedriver.PerServerLiveMigrateDriver"
DRIVERS = {"fake": DRIVER, "libvirt": "libvirt.LibvirtDriver"}
_ENV_DURATION = "HOSTMAINT_NOVA_FAKE_MIGRATION_S"


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hosts", nargs="+", help="names of the compute hosts to start")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    parser.add_argument("--ready-file", help="write the ready JSON here (atomically)")
    parser.add_argument("--log-file", help="write Nova's log here")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG")
    parser.add_argument(
        "--migration-s",
        type=float,
        default=1.0,
        help="seconds a fake live migration runs unless the server's metadata says otherwise",
    )
    parser.add_argument(
        "--max-concurrent-live-migrations",
        type=int,
        default=8,
        help=(
            "Nova's [DEFAULT] max_concurrent_live_migrations; its pool is one per "
            "process, so in this single process it bounds all hosts together"
        ),
    )
    parser.add_argument(
        "--driver",
        choices=sorted(DRIVERS),
        default="fake",
        help=(
            "fake: per-server fake migrations; "
            "libvirt: Nova's own libvirt driver on the lab's hosts (see nova_libvirt.py)"
        ),
    )
    parser.add_argument(
        "--lab-config",
        help="the lab's host map (JSON, see nova_libvirt.py); needed by --driver libvirt",
    )
    parser.add_argument(
        "--flag",
        action="append",
        default=[],
        metavar="[GROUP.]NAME=VALUE",
        help="a nova.conf option (repeatable), e.g. libvirt.live_migration_timeout_action=abort",
    )
    parser.add_argument(
        "--response-validation",
        choices=("error", "warn", "ignore"),
        default="warn",
        help="Nova's [api] response_validation (its tests use error, deployments warn)",
    )
    return parser.parse_args(argv)


def _import_libvirt(lab_config):
    """The libvirt bindings from the folder the lab's host map names (Nova's venv has none)."""
    with open(lab_config) as f:
        folder = json.load(f).get("libvirt_python_dir", "")
    if folder and folder not in sys.path:
        sys.path.append(folder)  # appended: Nova's own libraries win
    import libvirt

    return libvirt


def _flag(text):
    """(group or None, name, value) from ``[GROUP.]NAME=VALUE``; lists split on commas."""
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--flag {text!r}: expected [GROUP.]NAME=VALUE")
    group, _, name = key.rpartition(".")
    parsed = {"true": True, "false": False}.get(value.lower(), value)
    return group or None, name, parsed


def _rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _write_ready(path, info):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def main(argv=None):
    args = _parse(argv if argv is not None else sys.argv[1:])
    started = time.monotonic()
    os.environ[_ENV_DURATION] = str(args.migration_s)
    if args.driver == "libvirt":
        if not args.lab_config:
            print(f"--driver {args.driver} needs --lab-config", file=sys.stderr)
            return 2
    # Test-runner settings that would cut a long-lived process short.
    for name in ("OS_TEST_TIMEOUT", "OS_STDOUT_CAPTURE", "OS_STDERR_CAPTURE"):
        os.environ.pop(name, None)

    if args.driver == "libvirt":
        # Before Nova's modules: they import libvirt once, when they load.
        _import_libvirt(args.lab_config)
    # Importing Nova's functional tests applies eventlet's monkey patching.
    import eventlet
    import eventlet.wsgi
    import nova.virt
    from nova.tests.functional import integrated_helpers

    # Nova loads `compute_driver` as `nova.virt.<name>`: let that package
    # find the fake driver beside this file.
    nova.virt.__path__.append(HERE)
    lab_config = None
    if args.driver == "libvirt":
        from nova.virt import nova_libvirt

        lab_config = nova_libvirt.load(args.lab_config)
        nova_libvirt.remember_originals()
    flags = [_flag(text) for text in args.flag]

    hosts = list(dict.fromkeys(args.hosts))

    class Nova(integrated_helpers._IntegratedTestBase):
        ADMIN_API = True
        microversion = "latest"
        # Casts stay asynchronous, as in a real deployment: a live migration
        # answers 202 at once and runs in the compute service.
        CAST_AS_CALL = False

        def _setup_services(self):
            self.flags(
                api_paste_config=os.path.join(sys.prefix, "etc/nova/api-paste.ini"), group="wsgi"
            )
            self.flags(compute_driver=DRIVERS[args.driver])
            # Nova's test configuration turns response-schema failures into
            # errors; a deployment only warns (Nova's default and advice).
            self.flags(response_validation=args.response_validation, group="api")
            self.flags(max_concurrent_live_migrations=args.max_concurrent_live_migrations)
            if lab_config is not None:
                nova_libvirt.lift_guards(self)
                nova_libvirt.configure(self, lab_config)
            for group, name, value in flags:
                self.flags(**{name: value}, group=group)
            super()._setup_services()

        def _setup_compute_service(self):
            if lab_config is not None:
                return nova_libvirt.start_computes(self, lab_config, hosts)
            first = None
            for host in hosts:
                compute = self._start_compute(host)
                first = first or compute
            return first

        def runTest(self):
            """Nothing: the fixtures are the point."""

    imported_s = time.monotonic() - started
    nova = Nova()
    stop = []

    def _stop(signum, frame):
        stop.append(signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        try:
            nova.setUp()
        except Exception:  # noqa: BLE001 - any failure to set up ends the process
            # Nova's clean-up after a failed set-up can wait forever on its own
            # thread pools: say why, and leave (nothing outlives this process).
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        if args.log_file:
            handler = logging.FileHandler(args.log_file)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
            )
            handler.setLevel(logging.DEBUG if args.debug else logging.INFO)
            logging.getLogger().addHandler(handler)
        app = nova.api_fixture.app()
        sock = eventlet.listen(("127.0.0.1", args.port))
        port = sock.getsockname()[1]
        wsgi_log = logging.getLogger("hostmaint.nova_server.wsgi")
        server = eventlet.spawn(
            eventlet.wsgi.server, sock, app, log=wsgi_log, log_output=args.debug
        )
        if lab_config is not None:
            nova_libvirt.register_images(nova.glance, lab_config)
        images = [{"id": i["id"], "name": i["name"]} for i in nova.glance.images.values()]
        info = {
            "port": port,
            "pid": os.getpid(),
            "hosts": hosts,
            "driver": args.driver,
            "images": images,
            "image_id": images[0]["id"] if images else None,
            "flavors": _flavors(nova),
            "startup_s": round(time.monotonic() - started, 3),
            "import_s": round(imported_s, 3),
            "rss_bytes": _rss_bytes(),
        }
        if args.ready_file:
            _write_ready(args.ready_file, info)
        print("NOVA READY " + json.dumps(info), flush=True)
        while not stop:
            eventlet.sleep(0.1)
        server.kill()
        sock.close()
    except BaseException:
        # Printed now: the clean-up that follows can take long.
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        nova.doCleanups()
    return 0


def _flavors(nova):
    resp = nova.api.api_get("/flavors/detail")
    return [
        {"id": f["id"], "name": f["name"], "ram": f["ram"], "vcpus": f["vcpus"]}
        for f in resp.body["flavors"]
    ]


if __name__ == "__main__":
    sys.exit(main())
