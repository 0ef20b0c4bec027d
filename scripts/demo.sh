#!/usr/bin/env bash
# The main job, runnable on a fresh Debian/Ubuntu machine as root: installs
# what it needs, starts a hostmaint agent against an embedded libvirt host
# (test:/// driver, etc/demo-node.xml) and prints what the agent reports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"

work=$(mktemp -d /tmp/hostmaint-demo.XXXXXX)
port=${HOSTMAINT_DEMO_PORT:-17710}
cat > "$work/agent.conf" <<CONF
[libvirt]
uri = test://$PWD/etc/demo-node.xml
[grpc]
listen = 127.0.0.1:$port
[dirty_rate]
enabled = false
CONF
hostmaint-agent --config-file "$work/agent.conf" > "$work/agent.log" 2>&1 &
agent_pid=$!
trap 'kill $agent_pid 2>/dev/null; wait $agent_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do
  python -m hostmaint.common.probe "127.0.0.1:$port" --service hostmaint.v1.HostAgent >/dev/null 2>&1 && break
  sleep 0.2
done
echo "== health"
python -m hostmaint.common.probe "127.0.0.1:$port" --service hostmaint.v1.HostAgent
echo "== report"
python -m hostmaint.agent.report "127.0.0.1:$port"
