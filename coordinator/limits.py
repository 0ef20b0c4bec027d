"""Bounds of what a drain policy may ask for (pure).

One place for them: the CLI refuses a request outside them before sending it, the
coordinator's servicer refuses it on receipt (``views``), the configuration refuses
such defaults, and the benchmark such a ``--postcopy-stretch``.
"""

from __future__ import annotations

MAX_DOWNTIME_MS = 2_000_000  # QEMU's limit for its max downtime is 2000 s
MAX_PARALLEL = 64  # migrations at once from a host, or into one target
MAX_DEADLINE_S = 7 * 24 * 3600.0
MAX_POSTCOPY_STRETCH = 1.0  # a drain at most twice as long as its soonest plan
