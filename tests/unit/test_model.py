"""The convergence model: hand-computed pre-copy cases and its invariants."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmaint.coordinator.convergence import predict, predict_at, run_alone
from hostmaint.coordinator.model import (
    DEFAULT_PARAMS,
    MIB,
    SEQUENTIAL_WRITER_BEHIND_FACTOR,
    DrainPolicy,
    Link,
    Outcome,
    Settings,
    Tuning,
    VmSpec,
    WriterKind,
    qemu_downtime_limit_ms,
)

MB = 1_000_000
BARE = dataclasses.replace(
    DEFAULT_PARAMS,
    setup_s=0.0,
    finish_s=0.0,
    switchover_ms=0.0,
    device_state_bytes=0,
    zero_page_cost_fraction=0.0,
    iteration_s=0.2,
)


def vm(**kw: object) -> VmSpec:
    base: dict[str, object] = dict(uuid="u", name="n", memory_bytes=1000 * MB)
    base.update(kw)
    return VmSpec(**base)


def test_idle_vm_is_one_round_at_link_speed() -> None:
    p = dataclasses.replace(BARE, setup_s=2.0, finish_s=1.0, switchover_ms=20.0)
    p = dataclasses.replace(p, device_state_bytes=1 * MB)
    mig = run_alone(vm(nonzero_bytes=500 * MB), 100 * MB, Settings(300.0), p)
    assert mig.outcome is Outcome.COMPLETED
    assert mig.rounds == 1
    zero_scan_s = 500 * MB / p.zero_scan_bytes_per_s
    # 2 s set-up + 500 MB at 100 MB/s + the scan of the 500 MB of zero pages after them
    # + switch-over (1 MB + 20 ms) + 1 s clean-up
    assert mig.end_s == pytest.approx(2.0 + 5.0 + zero_scan_s + 0.01 + 0.02 + 1.0)
    # the round ends on zero pages: nothing but the device state goes in the downtime
    assert mig.downtime_s == pytest.approx(0.01 + 0.02)
    assert mig.bytes_sent == pytest.approx(501 * MB)


def test_two_rounds_by_hand() -> None:
    # V = W = 1000 MB, 100 MB/s, 10 MB/s dirtying uniformly (behind factor 1), limit 1 s:
    # threshold 100 MB, the bitmap syncs 0.1 s (half an iteration) before it: at 90 MB left.
    # round 1: 910 MB in 9.1 s; a write lands behind the cursor with the share of W sent,
    #   which grows from 0 to 910/1000: 10 * 9.1 * (1000 - (1000 + 90) / 2) / 1000 MB
    # round 2 sends the 90 MB left plus that; of W, (1000 - pending) is outside the round
    #   (always resent), and the sent share of the round grows from 0 to (pending - 90)
    # the pending after round 2 is below 100 MB: the switch-over sends it.
    p = dataclasses.replace(BARE, behind_write_factor=1.0)
    v = vm(nonzero_bytes=1000 * MB, dirty_rate_bytes_per_s=10 * MB, working_set_bytes=1000 * MB)
    mig = run_alone(v, 100 * MB, Settings(1000.0), p)
    behind1 = 10 * 9.1 * (1000 - (1000 + 90) / 2) / 1000
    p1 = 90 + behind1
    t2 = (p1 - 90) / 100
    behind2 = 10 * (t2 * (1000 - p1) / 1000 + t2 * (p1 - (p1 + 90) / 2) / 1000)
    p2 = 90 + behind2
    assert mig.outcome is Outcome.COMPLETED
    assert mig.rounds == 2
    assert mig.pending_at_sync == pytest.approx([p1 * MB, p2 * MB])
    assert mig.downtime_s == pytest.approx(p2 / 100)
    assert mig.end_s == pytest.approx(9.1 + t2 + p2 / 100)


def test_writes_ahead_of_the_cursor_go_once() -> None:
    # the working set is the last W bytes of round 1: before the cursor reaches it, writes
    # cost nothing; a smaller behind factor resends less; a writer that laps the cursor
    # resends at least its excess over the link
    base = vm(nonzero_bytes=1000 * MB, dirty_rate_bytes_per_s=20 * MB, working_set_bytes=100 * MB)
    uniform = dataclasses.replace(BARE, behind_write_factor=1.0)
    seq = dataclasses.replace(BARE, behind_write_factor=0.1)
    a = run_alone(base, 100 * MB, Settings(300.0), uniform)
    b = run_alone(base, 100 * MB, Settings(300.0), seq)
    assert a.outcome is Outcome.COMPLETED and b.outcome is Outcome.COMPLETED
    # the sync comes at 20 MB left (30 MB threshold less half an iteration); behind the
    # cursor: 20 MB/s for 0.8 s (100 MB down to 20) with the share sent rising from 0 to 80 %
    assert a.pending_at_sync[0] == pytest.approx((20 + 20 * 0.8 * 0.4) * MB)
    assert b.pending_at_sync[0] == pytest.approx((20 + 0.1 * 20 * 0.8 * 0.4) * MB)
    # 300 MB/s laps the cursor: all 80 MB of W already sent are dirty again
    fast = dataclasses.replace(base, dirty_rate_bytes_per_s=300 * MB)
    c = run_alone(fast, 100 * MB, Settings(300.0), seq)
    assert c.pending_at_sync[0] == pytest.approx(100 * MB)


def test_dirty_rate_above_bandwidth_never_converges() -> None:
    v = vm(nonzero_bytes=1000 * MB, dirty_rate_bytes_per_s=150 * MB, writer=WriterKind.PACED)
    assert run_alone(v, 100 * MB, Settings(300.0), BARE).outcome is Outcome.NOT_CONVERGED


def test_small_working_set_converges_once_limit_covers_it() -> None:
    # dirtying twice the link, but only 40 MB of it: converges when 40 MB fits the limit
    v = vm(nonzero_bytes=800 * MB, dirty_rate_bytes_per_s=200 * MB, working_set_bytes=40 * MB)
    assert run_alone(v, 100 * MB, Settings(300.0), BARE).outcome is Outcome.NOT_CONVERGED
    done = run_alone(v, 100 * MB, Settings(600.0), BARE)
    assert done.outcome is Outcome.COMPLETED
    assert done.downtime_s <= 0.6


def test_planned_postcopy_gives_precopy_its_tries_first() -> None:
    """A writer that pre-copy moves in a few rounds: with at least as many tries after the
    first pass it never switches; with fewer it switches once they are spent."""
    v = vm(nonzero_bytes=1000 * MB, dirty_rate_bytes_per_s=60 * MB, working_set_bytes=200 * MB)
    pre = run_alone(v, 100 * MB, Settings(300.0), BARE)
    assert pre.outcome is Outcome.COMPLETED and pre.rounds >= 3
    for tries in range(pre.rounds + 1):
        s = Settings(300.0, postcopy_permitted=True, postcopy_after_first_round=True)
        mig = run_alone(v, 100 * MB, dataclasses.replace(s, precopy_tries=tries), BARE)
        assert mig.outcome is Outcome.COMPLETED
        if tries >= pre.rounds - 1:
            assert not mig.postcopy and mig.end_s == pytest.approx(pre.end_s)
        else:
            assert mig.postcopy and mig.rounds == tries + 1


def test_lab_guest_alone_converges_sharing_does_not() -> None:
    """The lab's p40 guest (bench/lab-groundtruth.csv): 512 MiB, rewriting 160 MiB at
    40 MiB/s over 400 Mbit/s. Measured alone: 4.8-6.5 s, 358 ms real downtime at a 300 ms
    limit. At half the link the writer laps the copy cursor and it never converges."""
    v = vm(
        memory_bytes=512 * MIB,
        nonzero_bytes=160 * MIB,
        working_set_bytes=160 * MIB,
        dirty_rate_bytes_per_s=40 * MIB,
        writer=WriterKind.PACED,
    )
    lab = dataclasses.replace(DEFAULT_PARAMS, behind_write_factor=SEQUENTIAL_WRITER_BEHIND_FACTOR)
    bw = 400e6 / 8 * DEFAULT_PARAMS.link_efficiency
    alone = run_alone(v, bw, Settings(300.0), lab)
    half = run_alone(v, bw / 2, Settings(300.0), lab)
    assert alone.outcome is Outcome.COMPLETED
    assert alone.end_s is not None and 4.0 < alone.end_s < 7.0
    assert 0.3 < alone.downtime_s < 0.45
    assert half.outcome is Outcome.NOT_CONVERGED
    # The planner's default writer is uniform: it expects more re-sent rounds, never fewer.
    planned = run_alone(v, bw, Settings(300.0))
    assert planned.outcome is Outcome.COMPLETED
    assert planned.end_s is not None and planned.end_s >= alone.end_s


def test_auto_converge_steps_and_writer_kinds() -> None:
    heavy: dict[str, int] = dict(memory_bytes=2000 * MB, dirty_rate_bytes_per_s=300 * MB)
    cpu = run_alone(vm(writer=WriterKind.CPU, **heavy), 100 * MB, Settings(300.0, True), BARE)
    paced = run_alone(vm(writer=WriterKind.PACED, **heavy), 100 * MB, Settings(300.0, True), BARE)
    assert cpu.outcome is Outcome.COMPLETED
    assert cpu.throttle_pct >= 20.0 and (cpu.throttle_pct - 20.0) % 10.0 == 0.0
    assert paced.outcome is Outcome.NOT_CONVERGED


def test_predict_picks_the_cheapest_tuning() -> None:
    link = Link(100 * MB / DEFAULT_PARAMS.link_efficiency)
    pol = DrainPolicy(max_downtime_ms=1000.0, allow_postcopy=False)
    idle = vm(nonzero_bytes=500 * MB)
    assert predict(idle, link, pol).tuning is Tuning.NONE
    small_ws = vm(
        nonzero_bytes=800 * MB, dirty_rate_bytes_per_s=200 * MB, working_set_bytes=70 * MB
    )
    assert predict(small_ws, link, pol).tuning is Tuning.RAISE_DOWNTIME
    cpu = vm(
        memory_bytes=2000 * MB,
        working_set_bytes=500 * MB,
        dirty_rate_bytes_per_s=300 * MB,
        writer=WriterKind.CPU,
    )
    assert predict(cpu, link, pol).tuning is Tuning.AUTO_CONVERGE
    paced = dataclasses.replace(cpu, writer=WriterKind.PACED)
    assert predict(paced, link, pol).tuning is Tuning.CANNOT_CONVERGE
    post = predict(paced, link, dataclasses.replace(pol, allow_postcopy=True))
    assert post.tuning is Tuning.POSTCOPY and post.converges and not post.converges_untuned
    assert post.downtime_ms < 1000.0


def test_qemu_limit_leaves_room_for_the_real_overshoot() -> None:
    bw = 50 * MB
    limit = qemu_downtime_limit_ms(300.0, bw)
    assert limit < 300.0 - DEFAULT_PARAMS.switchover_ms
    assert qemu_downtime_limit_ms(300.0, bw, worst_bandwidth_bytes_per_s=bw / 2) < limit


rates = st.floats(min_value=0.0, max_value=200.0)
sizes = st.integers(min_value=64, max_value=4096)


@settings(max_examples=40, deadline=None)
@given(r1=rates, r2=rates, mem=sizes, ws_frac=st.floats(0.05, 1.0))
def test_total_time_monotonic_in_dirty_rate(r1: float, r2: float, mem: int, ws_frac: float) -> None:
    lo, hi = sorted((r1, r2))
    base = vm(memory_bytes=mem * MIB, working_set_bytes=int(mem * ws_frac * MIB) + 1)
    a = run_alone(
        dataclasses.replace(base, dirty_rate_bytes_per_s=lo * MIB), 100 * MIB, Settings(300.0)
    )
    b = run_alone(
        dataclasses.replace(base, dirty_rate_bytes_per_s=hi * MIB), 100 * MIB, Settings(300.0)
    )
    if b.outcome is Outcome.COMPLETED:
        assert a.outcome is Outcome.COMPLETED
        assert a.end_s is not None and b.end_s is not None
        assert a.end_s <= b.end_s + 1e-6
    pa = predict_at(
        dataclasses.replace(base, dirty_rate_bytes_per_s=lo * MIB), 100 * MIB, DrainPolicy()
    )
    pb = predict_at(
        dataclasses.replace(base, dirty_rate_bytes_per_s=hi * MIB), 100 * MIB, DrainPolicy()
    )
    assert pa.converges_untuned or not pb.converges_untuned


@settings(max_examples=40, deadline=None)
@given(m1=sizes, m2=sizes, rate=rates)
def test_total_time_monotonic_in_memory(m1: int, m2: int, rate: float) -> None:
    lo, hi = sorted((m1, m2))

    def mk(m: int) -> VmSpec:
        return vm(
            memory_bytes=m * MIB, working_set_bytes=64 * MIB, dirty_rate_bytes_per_s=rate * MIB
        )

    a = run_alone(mk(lo), 100 * MIB, Settings(300.0))
    b = run_alone(mk(hi), 100 * MIB, Settings(300.0))
    if b.outcome is Outcome.COMPLETED:
        assert a.outcome is Outcome.COMPLETED
        assert a.end_s is not None and b.end_s is not None
        assert a.end_s <= b.end_s + 1e-6
