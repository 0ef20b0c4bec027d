"""The agent's pure tuning decisions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostmaint.agent import tuning


def test_downtime_is_only_raised() -> None:
    assert tuning.decide_max_downtime(500, 2000) == tuning.DowntimeDecision(True, 2000)
    assert tuning.decide_max_downtime(500, 500) == tuning.DowntimeDecision(False, 500)
    lowered = tuning.decide_max_downtime(2000, 500)
    assert not lowered.apply and "lower_max_downtime" in lowered.refused
    # the end of a burst lowers it, when asked to
    assert tuning.decide_max_downtime(2000, 500, lower=True) == tuning.DowntimeDecision(True, 500)
    assert tuning.decide_max_downtime(2000, 0, lower=True).refused
    assert "QEMU" in tuning.decide_max_downtime(300, 3_000_000).refused
    assert tuning.decide_max_downtime(300, 0).refused


@given(st.integers(1, 2_000_000), st.integers(-5, 2_100_000))
def test_downtime_decision_never_lowers(current: int, requested: int) -> None:
    decision = tuning.decide_max_downtime(current, requested)
    assert decision.value_ms >= current
    assert decision.apply == (not decision.refused and requested != current)


def test_reassert_after_an_external_step() -> None:
    # nova-compute's next downtime step lowered our 2000 ms back to 250 ms.
    assert tuning.reassert_downtime(250, 2000) == 2000
    assert tuning.reassert_downtime(2500, 2000) is None
    assert tuning.reassert_downtime(250, None) is None


def test_who_set_the_downtime() -> None:
    assert tuning.downtime_set_by(2000, 2000) == tuning.SET_BY_HOSTMAINT
    assert tuning.downtime_set_by(250, 2000) == tuning.SET_BY_EXTERNAL
    assert tuning.downtime_set_by(300, None) == tuning.SET_BY_EXTERNAL


def test_vcpu_quota() -> None:
    assert tuning.vcpu_quota_pct(0) == 100
    assert tuning.vcpu_quota_pct(70) == 30
    with pytest.raises(ValueError, match="between 0 and 99"):
        tuning.vcpu_quota_pct(100)
