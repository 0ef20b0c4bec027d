#!/usr/bin/env bash
# Installs what hostmaint needs on a Debian/Ubuntu machine, as root:
# the system packages of bindep.txt with apt-get (only those missing), then the project and its
# test tools into ./.venv at the versions pinned in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

# bindep.txt is the list: every package of it for Debian ([platform:dpkg]).
bindep_packages() {
  sed -e 's/#.*//' bindep.txt | awk 'NF && ($0 !~ /\[/ || $0 ~ /platform:dpkg/) { print $1 }'
}
mapfile -t SYSTEM_PACKAGES < <(bindep_packages)
if [ "${1:-}" = "--list-system-packages" ]; then
  printf '%s\n' "${SYSTEM_PACKAGES[@]}"
  exit 0
fi

missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing system packages (${missing[*]}); run as root" >&2
    exit 1
  fi
  echo "bootstrap: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.hostmaint-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "bootstrap: installing hostmaint into .venv (log: .venv/install.log)"
  if ! { .venv/bin/pip install --disable-pip-version-check -U pip &&
         .venv/bin/pip install --disable-pip-version-check -c constraints.txt \
           -e '.[test,postgres,ha,metrics,osc]' mypy ruff types-protobuf types-psutil tox; } > .venv/install.log 2>&1; then
    tail -40 .venv/install.log >&2
    exit 1
  fi
  touch "$stamp"
fi
