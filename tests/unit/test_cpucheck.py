"""The CPU verdict: a target is judged against the host the guest runs on now."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hostmaint.coordinator.cpucheck import Comparison, Rule, judge, needs_host_cpu

OK = Comparison(True)


def _lacks(*features: str) -> Comparison:
    return Comparison(False, frozenset(features), f"lacks {', '.join(features)}")


def test_a_target_libvirt_accepts_runs_the_guest() -> None:
    v = judge(OK, OK)
    assert v.compatible and v.rule is Rule.GUEST_CPU
    assert judge(_lacks("topoext"), OK).compatible  # whatever the source says


def test_a_definition_refused_on_its_own_host_moves_to_a_host_lacking_the_same() -> None:
    # Nested KVM: the live EPYC definition lacks topoext everywhere, yet runs.
    v = judge(_lacks("topoext"), _lacks("topoext"))
    assert v.compatible and v.rule is Rule.AS_ON_SOURCE
    assert "topoext" in str(v)
    assert judge(_lacks("pni", "svm"), _lacks("svm")).compatible


def test_a_target_lacking_more_than_the_current_host_is_refused_naming_what() -> None:
    v = judge(_lacks("topoext"), _lacks("topoext", "lahf_lm"))
    assert not v.compatible and v.rule is Rule.REFUSED
    assert "lahf_lm" in v.detail and "topoext" not in v.detail
    fits_here = judge(OK, _lacks("lahf_lm"))
    assert not fits_here.compatible and "lahf_lm" in fits_here.detail


def test_comparisons_naming_no_features_leave_it_to_the_hosts_cpus() -> None:
    vague = Comparison(False, frozenset(), "vendor mismatch")
    v = judge(vague, _lacks("x"))
    assert not v.compatible and v.rule is Rule.UNDECIDED
    assert needs_host_cpu("custom", v)
    assert needs_host_cpu("host-passthrough", None)
    assert not needs_host_cpu("custom", judge(OK, OK))
    host = judge(_lacks("pni"), _lacks("pni"), host_cpu=True)
    assert host.compatible and host.rule is Rule.HOST_CPU_AS_ON_SOURCE


FEATURES = st.frozensets(st.sampled_from(["pni", "svm", "topoext", "lahf_lm", "avx2", "x2apic"]))


@given(FEATURES, FEATURES)
def test_never_accepts_a_target_that_lacks_a_feature_the_current_host_has(
    source_lacks: frozenset[str], target_lacks: frozenset[str]
) -> None:
    on_source = Comparison(not source_lacks, source_lacks)
    on_target = Comparison(not target_lacks, target_lacks)
    v = judge(on_source, on_target)
    if v.compatible:
        assert target_lacks <= source_lacks
    elif target_lacks <= source_lacks:
        assert v.rule is Rule.UNDECIDED  # only where nothing names what is lacking
