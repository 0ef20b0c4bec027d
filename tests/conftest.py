"""Session-wide rules: where the machine can run the lab or the real Nova, those tests must run.

`scripts/test.sh` sets HOSTMAINT_REQUIRE=lab,nova when the machine has what
they need (root and a usable /dev/kvm; Nova's own virtualenv can be built),
and the run fails if any test of those kinds was skipped anyway. The same
holds for `postgres` (the journal on a throwaway PostgreSQL cluster; Debian's
server binaries under /usr/lib/postgresql/*/bin) and `etcd` (coordination
through tooz on a throwaway etcd; Debian's /usr/bin/etcd), which test.sh
requires where those binaries are installed, and for `install` (a plain
install of the package into a fresh virtualenv, `tests/install`; a C compiler
and libvirt's development files to build libvirt-python), which test.sh
requires where those are, and for `chromium` (the drain report looked at in
headless Chromium, `tests/report`), which test.sh requires where
/usr/bin/chromium is, and for `osc` (the `openstack` command with the plugin,
`tests/osc`), which test.sh always requires: bootstrap.sh installs the extra.
"""

from __future__ import annotations

import os

import pytest

_skipped: dict[str, list[str]] = {}


def _required() -> set[str]:
    return {k.strip() for k in os.environ.get("HOSTMAINT_REQUIRE", "").split(",") if k.strip()}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: needs PostgreSQL's server binaries")
    config.addinivalue_line("markers", "etcd: needs etcd's server binary")
    config.addinivalue_line(
        "markers", "install: needs a C compiler and libvirt-dev to pip install the package"
    )
    config.addinivalue_line("markers", "chromium: needs headless Chromium (Debian's chromium)")
    config.addinivalue_line(
        "markers", "osc: needs the OpenStack client (the osc extra) in the virtualenv"
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped:
        return
    for kind in _required():
        if kind in report.keywords:
            _skipped.setdefault(kind, []).append(f"{report.nodeid}: {report.longrepr}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for kind, tests in _skipped.items():
            line = f"{len(tests)} {kind} test(s) skipped although this machine can run them"
            if reporter is not None:
                reporter.write_line(line, red=True)
                for t in tests[:5]:
                    reporter.write_line(f"  {t}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
