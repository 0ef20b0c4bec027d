"""The executor's pure decisions: what starts now, and the escalation ladder."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from hostmaint.coordinator import escalation as esc
from hostmaint.coordinator.dispatch import Slot, ready_to_start
from hostmaint.coordinator.model import margin_ms

MB = 1e6


def test_first_always_starts_even_if_it_needs_the_whole_link() -> None:
    chosen = ready_to_start(
        [Slot("a", "t1", 900 * MB), Slot("b", "t2", 10 * MB)],
        [],
        max_parallel=4,
        max_parallel_per_target=2,
        link_bytes_per_s=100 * MB,
    )
    assert [s.vm_uuid for s in chosen] == ["a"]


def test_backfill_with_what_fits() -> None:
    running = [Slot("r", "t1", 40 * MB)]
    queue = [Slot("big", "t2", 55 * MB), Slot("small", "t2", 30 * MB), Slot("t1again", "t1", 1)]
    chosen = ready_to_start(
        queue, running, max_parallel=4, max_parallel_per_target=1, link_bytes_per_s=100 * MB
    )
    # big needs more than half the link, small does not; t1 already has its one slot.
    assert [s.vm_uuid for s in chosen] == ["small"]


def test_needs_that_add_up_to_less_than_the_link_may_still_not_share_it() -> None:
    # 60 + 10 fits 100, but two migrations get 50 each: the writer would not converge
    # beside the other, and would take from it what it needs to converge.
    kwargs = dict(max_parallel=4, max_parallel_per_target=2, link_bytes_per_s=100 * MB)
    writer = Slot("writer", "t1", 60 * MB)
    idle = Slot("idle", "t2", 10 * MB)
    assert ready_to_start([idle], [writer], **kwargs) == []
    assert ready_to_start([writer], [idle], **kwargs) == []
    # a third start would cut the running ones' shares below what they need
    two = [Slot("a", "t1", 40 * MB), Slot("b", "t2", 40 * MB)]
    assert ready_to_start([Slot("c", "t3", 1)], two, **kwargs) == []
    assert [s.vm_uuid for s in ready_to_start([Slot("c", "t3", 1)], two[:1], **kwargs)] == ["c"]


@given(
    st.lists(st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.floats(0, 200)), max_size=12),
    st.integers(1, 6),
    st.integers(1, 3),
)
def test_limits_are_never_exceeded(
    items: list[tuple[str, float]], par: int, per_target: int
) -> None:
    queue = [Slot(f"vm{i}", t, need * MB) for i, (t, need) in enumerate(items)]
    chosen = ready_to_start(
        queue, [], max_parallel=par, max_parallel_per_target=per_target, link_bytes_per_s=100 * MB
    )
    assert len(chosen) <= par
    for t in ("t1", "t2", "t3"):
        assert sum(1 for s in chosen if s.target == t) <= per_target
    if len(chosen) > 1:  # each gets its fair share: at least what it needs
        assert max(s.need_bytes_per_s for s in chosen) * len(chosen) <= 100 * MB + 1e-6
    if queue:
        assert chosen  # something always starts when nothing runs


def _history(
    remaining: list[int], start_s: float = 0.0, step_s: float = 2.0
) -> list[esc.Observation]:
    return [
        esc.Observation(start_s + i * step_s, i + 1, r, 50 * MB, 300)
        for i, r in enumerate(remaining)
    ]


LIMITS = esc.Limits(
    predicted_total_s=20.0,
    qemu_downtime_cap_ms=800,
    allow_postcopy=True,
    postcopy_permitted=True,
    cpu_bound=True,
)


def test_on_schedule_nothing_happens() -> None:
    h = _history([900, 700, 500, 300, 200, 100])
    assert esc.next_step(h, LIMITS, esc.Escalation()).action is esc.Action.NONE


def test_ladder_cheapest_first() -> None:
    stuck = _history([500] * 20)  # 40 s, no progress, prediction 20 s
    done = esc.Escalation()
    actions = []
    at = 40.0
    for _ in range(6):
        d = esc.next_step(stuck, LIMITS, done)
        actions.append((d.action, d.value))
        done = esc.applied(done, d, at)
        stuck = _history([500] * 20, start_s=at - 30)
        at += 10.0
    assert actions[:5] == [
        (esc.Action.RAISE_DOWNTIME, 800),
        (esc.Action.THROTTLE_VCPUS, 40),
        (esc.Action.THROTTLE_VCPUS, 70),
        (esc.Action.THROTTLE_VCPUS, 90),
        (esc.Action.POSTCOPY, 0),
    ]
    assert actions[5][0] is esc.Action.NONE  # post-copy always finishes: nothing more


def test_without_postcopy_or_cpu_bound_it_aborts() -> None:
    limits = esc.Limits(20.0, 800, allow_postcopy=False, postcopy_permitted=False, cpu_bound=False)
    stuck = _history([500] * 20)
    done = esc.applied(esc.Escalation(), esc.Decision(esc.Action.RAISE_DOWNTIME, 800), 0.0)
    assert esc.next_step(stuck, limits, done).action is esc.Action.ABORT


def test_a_step_gets_time_to_work() -> None:
    stuck = _history([500] * 20)
    done = esc.applied(esc.Escalation(), esc.Decision(esc.Action.RAISE_DOWNTIME, 800), 36.0)
    assert esc.next_step(stuck, LIMITS, done).action is esc.Action.NONE  # 38 s - 36 s < settle


def test_nothing_starts_beside_a_migration_that_holds_the_link() -> None:
    queue = [Slot("next", "t2", 1 * MB)]
    held = [Slot("hot", "t1", 10 * MB, holds_link=True)]
    free = [Slot("hot", "t1", 10 * MB)]
    kwargs = {"max_parallel": 4, "max_parallel_per_target": 2, "link_bytes_per_s": 100 * MB}
    assert ready_to_start(queue, held, **kwargs) == []
    assert [s.vm_uuid for s in ready_to_start(queue, free, **kwargs)] == ["next"]


@given(st.floats(1 * MB, 500 * MB), st.integers(200, 5000))
def test_a_raised_limit_keeps_the_real_downtime_under_the_cap(bw: float, cap_ms: int) -> None:
    """If the final copy runs at the bandwidth QEMU measured, real downtime <= the cap."""
    limits = esc.Limits(
        20.0,
        100_000,
        allow_postcopy=False,
        postcopy_permitted=False,
        cpu_bound=False,
        operator_cap_ms=float(cap_ms),
    )
    now = esc.Observation(40.0, 30, 10**9, bw, 300)
    raised = esc.raised_downtime_ms(now, limits)
    assert raised >= 1
    assert raised + margin_ms(bw, limits.params) <= cap_ms or raised == 1


def test_a_raise_at_a_shared_bandwidth_is_lower() -> None:
    limits = esc.Limits(
        20.0,
        100_000,
        allow_postcopy=False,
        postcopy_permitted=False,
        cpu_bound=False,
        operator_cap_ms=1000.0,
    )
    alone = esc.raised_downtime_ms(esc.Observation(40.0, 30, 10**9, 47 * MB, 300), limits)
    shared = esc.raised_downtime_ms(esc.Observation(40.0, 30, 10**9, 12 * MB, 300), limits)
    assert 0 < shared < alone < 1000
    # The cloud's view carries no bandwidth: the precomputed cap stands.
    blind = esc.raised_downtime_ms(esc.Observation(40.0, 30, 10**9, 0.0, 0), limits)
    assert blind == 100_000
    # Alone on the link for now, but a neighbour still setting up will take half of it.
    now = esc.Observation(40.0, 30, 10**9, 47 * MB, 300, fair_share_bytes_per_s=23.5 * MB)
    before_neighbour = esc.raised_downtime_ms(now, limits)
    assert before_neighbour < alone
    assert before_neighbour + margin_ms(23.5 * MB) <= 1000 * 0.5 + 1  # half the bandwidth


def test_a_migration_planned_for_the_whole_link_starts_alone() -> None:
    alone = Slot("big", None, 10 * MB, holds_link=True)
    small = Slot("small", None, 1 * MB)
    running = [Slot("r", None, 1 * MB)]
    started = ready_to_start(
        [alone, small],
        running,
        max_parallel=4,
        max_parallel_per_target=4,
        link_bytes_per_s=MB * 100,
    )
    assert started == [small]  # it waits; the small one backfills
    started = ready_to_start(
        [alone, small], [], max_parallel=4, max_parallel_per_target=4, link_bytes_per_s=MB * 100
    )
    assert started == [alone]  # alone, and nothing beside it


def test_a_planned_postcopy_switches_once_the_first_pass_is_done() -> None:
    planned = dataclasses.replace(LIMITS, postcopy_after_first_pass=True)
    first = esc.Observation(3.0, 1, 900 * MB, 50 * MB, 300)
    after = dataclasses.replace(first, elapsed_s=9.0, iteration=2, first_pass_done=True)
    assert esc.next_step([first], planned, esc.Escalation()).action is esc.Action.NONE
    d = esc.next_step([first, after], planned, esc.Escalation())
    assert (d.action, d.reason) == (esc.Action.POSTCOPY, "planned: post-copy after the first pass")
    # not without the plan's tuning, the policy's leave or post-copy enabled at the start
    assert esc.next_step([first, after], LIMITS, esc.Escalation()).action is esc.Action.NONE
    for off in ({"allow_postcopy": False}, {"postcopy_permitted": False}):
        limits = dataclasses.replace(planned, **off)  # type: ignore[arg-type]
        assert esc.next_step([first, after], limits, esc.Escalation()).action is esc.Action.NONE
    # once switched, nothing more
    done = esc.applied(esc.Escalation(), d, 9.0)
    assert esc.next_step([first, after], planned, done).action is esc.Action.NONE


def test_a_planned_postcopy_with_precopy_tries_waits_for_them() -> None:
    """Two rounds after the first pass to converge by pre-copy (QEMU's sync count 3 and 4):
    the switch comes once QEMU syncs a third time after the first pass, not before."""
    planned = dataclasses.replace(LIMITS, postcopy_after_first_pass=True, precopy_tries=2)
    h = [
        esc.Observation(3.0 + i, it, 400 * MB, 50 * MB, 300, first_pass_done=it >= 2)
        for i, it in enumerate((1, 2, 3))
    ]
    for n in range(1, len(h) + 1):
        assert esc.next_step(h[:n], planned, esc.Escalation()).action is esc.Action.NONE
    h.append(dataclasses.replace(h[-1], elapsed_s=7.0, iteration=4))
    d = esc.next_step(h, planned, esc.Escalation())
    assert d.action is esc.Action.POSTCOPY
    assert d.reason == (
        "planned: post-copy, pre-copy did not converge in 2 rounds after the first pass"
    )


def test_a_refused_postcopy_switch_leads_to_abort_not_to_nothing() -> None:
    stuck = _history([500] * 20)  # 40 s, no progress
    done = esc.applied(esc.Escalation(), esc.Decision(esc.Action.RAISE_DOWNTIME, 800), 0.0)
    for pct in (40, 70, 90):
        done = esc.applied(done, esc.Decision(esc.Action.THROTTLE_VCPUS, pct), 0.0)
    d = esc.next_step(stuck, LIMITS, done)
    assert d.action is esc.Action.POSTCOPY
    refused = esc.applied(done, d, 35.0, ok=False)
    assert not refused.postcopy and refused.postcopy_failed
    assert esc.next_step(stuck, LIMITS, refused).action is esc.Action.NONE  # settling
    later = _history([500] * 20, start_s=10.0)
    assert esc.next_step(later, LIMITS, refused).action is esc.Action.ABORT
    # a planned switch that was refused is not asked again either
    planned = dataclasses.replace(LIMITS, postcopy_after_first_pass=True)
    after = esc.Observation(9.0, 2, 900 * MB, 50 * MB, 300, first_pass_done=True)
    first_try = esc.next_step([after], planned, esc.Escalation())
    assert first_try.action is esc.Action.POSTCOPY
    once = esc.applied(esc.Escalation(), first_try, 9.0, ok=False)
    assert esc.next_step([after], planned, once).action is esc.Action.NONE


BURST = dataclasses.replace(
    LIMITS, postcopy_after_first_pass=True, burst_s=2.0, link_bytes_per_s=100 * MB
)


def test_a_planned_postcopy_holds_the_link_for_its_switch_over_first() -> None:
    """Sharing the link: the planned switch is preceded by a burst (the others capped, the
    whole link's limit) and comes only once the burst ends without converging."""
    shared = esc.Observation(
        9.0, 2, 90 * MB, 25 * MB, 150, first_pass_done=True, fair_share_bytes_per_s=25 * MB
    )
    d = esc.next_step([shared], BURST, esc.Escalation())
    assert (d.action, d.value, d.restore_ms) == (esc.Action.HOLD_LINK, 800, 150)
    assert d.reason.startswith("planned: post-copy after the first pass")
    holding = esc.applied(esc.Escalation(), d, 9.0)
    assert holding.holding and holding.burst and holding.restore_ms == 150
    # it waits out the burst, whatever else it sees ...
    during = dataclasses.replace(shared, elapsed_s=10.5, remaining_bytes=80 * MB)
    assert esc.next_step([shared, during], BURST, holding).action is esc.Action.NONE
    # ... then restores its limit; the switch follows at once, no settling time
    after = dataclasses.replace(shared, elapsed_s=11.0, max_downtime_ms=800)
    released = esc.next_step([shared, after], BURST, holding)
    assert (released.action, released.value) == (esc.Action.RELEASE_LINK, 150)
    done = esc.applied(holding, released, 11.0)
    assert not done.holding and done.burst and done.after_burst
    d = esc.next_step([shared, after], BURST, done)
    assert d.action is esc.Action.POSTCOPY
    # alone on the link, or without the plan's leave, the switch comes with no burst
    alone = dataclasses.replace(shared, fair_share_bytes_per_s=100 * MB)
    assert esc.next_step([alone], BURST, esc.Escalation()).action is esc.Action.POSTCOPY
    no_burst = dataclasses.replace(BURST, burst_s=0.0)
    assert esc.next_step([shared], no_burst, esc.Escalation()).action is esc.Action.POSTCOPY


def test_a_burst_comes_before_abort_and_a_held_back_migration_waits() -> None:
    limits = dataclasses.replace(
        LIMITS, allow_postcopy=False, cpu_bound=False, burst_s=2.0, link_bytes_per_s=100 * MB
    )
    stuck = [
        dataclasses.replace(o, first_pass_done=True, fair_share_bytes_per_s=50 * MB)
        for o in _history([500] * 20)
    ]
    raised = esc.applied(esc.Escalation(), esc.Decision(esc.Action.RAISE_DOWNTIME, 800), 0.0)
    d = esc.next_step(stuck, limits, raised)
    assert d.action is esc.Action.HOLD_LINK
    assert esc.next_step(stuck, limits, esc.applied(raised, d, 38.0, ok=False)).action is (
        esc.Action.NONE  # the burst was refused: nothing held, the next step settles first
    )
    # held back by another's burst: no step at all, however late it is
    held = [*stuck[:-1], dataclasses.replace(stuck[-1], held_back=True)]
    assert esc.next_step(held, limits, raised).action is esc.Action.NONE


def test_a_burst_is_not_released_while_its_migration_switches_over() -> None:
    """What is left fits the limit at the bandwidth it gets: the switch-over is under way
    and the others must stay capped; it gets a second burst's time for it."""
    start = esc.Observation(
        9.0, 3, 90 * MB, 25 * MB, 150, first_pass_done=True, fair_share_bytes_per_s=25 * MB
    )
    holding = esc.applied(esc.Escalation(), esc.next_step([start], BURST, esc.Escalation()), 9.0)
    fitting = dataclasses.replace(
        start, remaining_bytes=70 * MB, bandwidth_bytes_per_s=100 * MB, max_downtime_ms=800
    )
    assert esc.next_step([dataclasses.replace(fitting, elapsed_s=11.5)], BURST, holding).action is (
        esc.Action.NONE
    )
    late = dataclasses.replace(fitting, elapsed_s=13.0)
    assert esc.next_step([late], BURST, holding).action is esc.Action.RELEASE_LINK


def test_samples_that_do_not_say_what_remains_are_no_stall() -> None:
    """A migration followed through a cloud that reports no remaining bytes (after a
    restart, with its agent unable to watch): within its predicted time nothing is
    taken for a stall, however many samples; with what remains known and flat, it is."""
    unknown = _history([0] * 10, step_s=1.5)  # 15 s, within the 20 s predicted
    assert esc.behind(unknown, LIMITS) == ""
    assert esc.next_step(unknown, LIMITS, esc.Escalation()).action is esc.Action.NONE
    flat = _history([500] * 10, step_s=1.5)
    assert esc.behind(flat, LIMITS).startswith("no progress")
    late = _history([0] * 25)  # 48 s: past the prediction, whatever the samples say
    assert esc.behind(late, LIMITS).startswith("elapsed")
