#!/usr/bin/env bash
# The main job, on a fresh Debian/Ubuntu machine as root: installs what it
# needs, brings up a three-host KVM lab with six guests on host 0, starts the
# coordinator and drains host 0 through `hostmaint drain` (live view), then
# checks that every guest runs exactly once elsewhere and tears it all down.
# Arguments go to `python -m hostmaint.lab.demo` (--spec, --state-dir, --keep,
# --keep-logs, --report FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python -m hostmaint.lab.demo --spec etc/demo-lab.toml "$@"
