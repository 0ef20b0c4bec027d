"""Whether a target can run a guest's CPU: a verdict that agrees with what will happen.

libvirt's hypervisor CPU comparison answers for a CPU definition against one
host. Taken alone it refuses moves that libvirt itself makes: on hosts whose
libvirt sees fewer CPU features than QEMU and KVM provide (nested KVM, for
one), a guest's definition, even its live one, is "incompatible" with the very
host it runs on now, because QEMU dropped or emulated what that host lacks,
and such guests migrate between identical hosts without complaint.

So a target is judged against the guest's current host, as Nova judges a
destination against its source:

1. ``GUEST_CPU``: libvirt accepts the guest's live CPU on the target.
2. ``AS_ON_SOURCE``: it does not, but the guest's current host lacks every
   feature the target lacks, and the guest runs there: the target offers it
   all it has now.
3. A guest that runs with its host's CPU (``host-passthrough``, ``maximum``),
   or whose comparisons name no missing features, is judged by the source
   host's own CPU through rules 1 and 2 (``HOST_CPU``,
   ``HOST_CPU_AS_ON_SOURCE``).

A target that lacks a feature the guest's current host has is refused, naming
it. Pure: comparisons in, a verdict out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# Guest CPU modes that take the host's CPU as it is: judged by the hosts' CPUs.
HOST_CPU_MODES = frozenset({"host-passthrough", "maximum"})


class Rule(StrEnum):
    GUEST_CPU = "libvirt accepts the guest's CPU there"
    AS_ON_SOURCE = "it lacks only features the guest's current host lacks too"
    HOST_CPU = "libvirt accepts the source host's CPU there"
    HOST_CPU_AS_ON_SOURCE = "its CPU lacks only features the source host's CPU lacks too"
    REFUSED = "it lacks features the guest's current host has"
    UNDECIDED = "libvirt names no missing features to judge by"


@dataclass(frozen=True)
class Comparison:
    """libvirt's answer for one CPU definition on one host."""

    compatible: bool
    missing_features: frozenset[str] = frozenset()
    reason: str = ""


@dataclass(frozen=True)
class CpuVerdict:
    compatible: bool
    rule: Rule
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.rule}{f' ({self.detail})' if self.detail else ''}"


def judge(on_source: Comparison, on_target: Comparison, *, host_cpu: bool = False) -> CpuVerdict:
    """One definition compared on the guest's current host and on a target.

    ``host_cpu``: the definition is the source host's CPU, not the guest's.
    """
    if on_target.compatible:
        return CpuVerdict(True, Rule.HOST_CPU if host_cpu else Rule.GUEST_CPU)
    if on_source.compatible:
        missing = sorted(on_target.missing_features)
        return CpuVerdict(
            False,
            Rule.REFUSED,
            f"lacks {', '.join(missing)}" if missing else on_target.reason or "incompatible",
        )
    if not on_source.missing_features or not on_target.missing_features:
        return CpuVerdict(False, Rule.UNDECIDED, on_target.reason)
    extra = on_target.missing_features - on_source.missing_features
    if extra:
        return CpuVerdict(False, Rule.REFUSED, f"lacks {', '.join(sorted(extra))}")
    return CpuVerdict(
        True,
        Rule.HOST_CPU_AS_ON_SOURCE if host_cpu else Rule.AS_ON_SOURCE,
        f"both lack {', '.join(sorted(on_target.missing_features))}",
    )


def needs_host_cpu(guest_mode: str, verdict: CpuVerdict | None) -> bool:
    """Whether the source host's CPU decides: a host-CPU guest, or an undecided verdict."""
    return guest_mode in HOST_CPU_MODES or (verdict is not None and verdict.rule is Rule.UNDECIDED)
