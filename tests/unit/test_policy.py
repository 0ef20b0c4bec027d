"""A request's policy, completed with the coordinator's defaults."""

from __future__ import annotations

import pytest

from hostmaint.coordinator import errors
from hostmaint.coordinator.model import DrainPolicy
from hostmaint.coordinator.views import policy_from_json, policy_to_json, validate_policy
from hostmaint.protos import coordinator_pb2 as cpb

DEFAULTS = DrainPolicy(max_downtime_ms=400.0, postcopy_avoidance_stretch=0.2)


def test_the_postcopy_stretch_is_the_requests_even_zero_else_the_default() -> None:
    assert validate_policy(cpb.DrainPolicy(), DEFAULTS).postcopy_avoidance_stretch == 0.2
    zero = cpb.DrainPolicy(postcopy_avoidance_stretch=0.0)
    assert validate_policy(zero, DEFAULTS).postcopy_avoidance_stretch == 0.0
    half = cpb.DrainPolicy(postcopy_avoidance_stretch=0.5)
    assert validate_policy(half, DEFAULTS).postcopy_avoidance_stretch == 0.5


@pytest.mark.parametrize("stretch", [-0.01, 1.01, float("nan"), float("inf")])
def test_a_postcopy_stretch_out_of_range_is_refused(stretch: float) -> None:
    with pytest.raises(errors.InvalidArgument, match="postcopy_avoidance_stretch"):
        validate_policy(cpb.DrainPolicy(postcopy_avoidance_stretch=stretch), DEFAULTS)


def test_an_explicit_zero_stretch_survives_the_journal() -> None:
    """A resumed drain re-reads its policy from the journal's JSON: 0 stays 0."""
    stored = policy_to_json(cpb.DrainPolicy(postcopy_avoidance_stretch=0.0))
    assert validate_policy(policy_from_json(stored), DEFAULTS).postcopy_avoidance_stretch == 0.0
    unset = policy_to_json(cpb.DrainPolicy())
    assert validate_policy(policy_from_json(unset), DEFAULTS).postcopy_avoidance_stretch == 0.2
