#!/usr/bin/env bash
# Creates ./.venv-nova: a real Nova (its functional-test fixtures run the API,
# conductor, scheduler, placement and fake compute services in one process)
# for the tests of the `nova` migration driver. Kept apart from ./.venv:
# Nova pins many libraries. Idempotent: a stamp records what was installed.
#
# Exit codes: 0 ready, 1 failed (e.g. no access to the package index).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${HOSTMAINT_NOVA_VENV:-.venv-nova}
PYTHON=${PYTHON:-python3}
# SQLAlchemy 2.1 makes the live-migration action answer 500: keep 2.0.
PACKAGES=(
  nova==34.0.0
  openstack-placement==16.0.0
  SQLAlchemy==2.0.52
  testtools oslotest wsgi-intercept requests-mock ddt
)
want="${PACKAGES[*]}"
stamp="$VENV/.hostmaint-nova-installed"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# Keep the environment out of git and out of ruff's walk of the tree.
printf '*\n' >"$VENV/.gitignore"
"$VENV/bin/pip" install -q --disable-pip-version-check -U pip
"$VENV/bin/pip" install -q --disable-pip-version-check "${PACKAGES[@]}"
"$VENV/bin/python" -c 'import nova.tests.functional.integrated_helpers' >/dev/null
printf '%s' "$want" >"$stamp"
