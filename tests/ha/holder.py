"""A coordinator-like process for the takeover test: leads, holds one host's
lock, heartbeats until it is killed.

    python -m tests.ha.holder BACKEND_URL GROUP MEMBER HOST LEASE_TTL_S HEARTBEAT_S
"""

from __future__ import annotations

import sys
import threading

from hostmaint.coordinator.ha_tooz import ToozCoordination


def main(argv: list[str]) -> int:
    url, group, member, host, ttl_s, interval_s = argv
    elected = threading.Event()
    ha = ToozCoordination(
        url,
        group,
        member,
        lease_ttl_s=int(ttl_s),
        heartbeat_interval_s=float(interval_s),
        on_elected=elected.set,
    )
    ha.start()
    if not elected.wait(60) or not ha.lock_host(host):
        print("not leader", flush=True)
        return 1
    print("leading", flush=True)
    threading.Event().wait()  # until SIGKILL
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
