#!/usr/bin/env bash
# The whole test suite: installs what it needs, then lint, types, the
# generated-code check and every test (the lab tests need root and /dev/kvm).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== lint"; ruff check . && ruff format --check .
echo "== mypy"; bash scripts/typecheck.sh
echo "== protos"; python tools/genprotos.py --check
# Where the machine can run the lab (root, a usable /dev/kvm), the real Nova,
# PostgreSQL, etcd, Chromium or a plain install of the package (a C compiler and
# libvirt-dev for libvirt-python, ensurepip), a skipped test of that kind fails
# the run (tests/conftest.py).
required=nova,osc
if [ "$(id -u)" -eq 0 ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
  required="lab,$required"
fi
if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
  required="$required,postgres"
fi
if [ -x /usr/bin/etcd ]; then
  required="$required,etcd"
fi
if [ -x /usr/bin/chromium ]; then
  required="$required,chromium"
fi
if { command -v cc || command -v gcc; } >/dev/null && pkg-config --exists libvirt 2>/dev/null &&
   python -c 'import ensurepip' 2>/dev/null; then
  required="$required,install"
fi
export HOSTMAINT_REQUIRE=${HOSTMAINT_REQUIRE-$required}
echo "== tests (required: $HOSTMAINT_REQUIRE)"
pytest -ra "$@"
