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
echo "== tests"; pytest -ra "$@"
