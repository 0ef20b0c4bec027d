"""The CLI's rendering on hand-made protos: tables, bars, the live view and its widths."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hostmaint.coordinator import cliformat, clilive, cliview
from hostmaint.protos import agent_pb2 as apb
from hostmaint.protos import coordinator_pb2 as pb
from tests.cli import samples
from tests.cli.samples import BATCH, BATCH_NAME, DB, GPU, T0, WEB

E = pb.DrainEventKind


def fold(events: list[pb.DrainEvent], delay_s: float = 0.0) -> clilive.LiveView:
    view = clilive.LiveView()
    for ev in events:
        view = clilive.apply(view, ev, ev.at.seconds + ev.at.nanos / 1e9 + delay_s)
    return view


def until(kind: int, nth: int = 1) -> list[pb.DrainEvent]:
    """The sample events up to and including the nth event of `kind`."""
    out = []
    seen = 0
    for ev in samples.events():
        out.append(ev)
        if ev.kind == kind:
            seen += 1
            if seen == nth:
                return out
    raise AssertionError(f"no event {kind} #{nth}")


def row_line(frame: str, name: str) -> str:
    lines = [line for line in frame.splitlines() if line.startswith(f"  {name}")]
    assert len(lines) == 1, frame
    return lines[0]


# ---- helpers -----------------------------------------------------------------------------


@given(st.floats(min_value=-2, max_value=3, allow_nan=False), st.integers(1, 200))
def test_bar_is_always_its_width_and_fills_in_proportion(fraction: float, width: int) -> None:
    text = cliformat.bar(fraction, width)
    assert len(text) == width + 2
    assert text[0] == "[" and text[-1] == "]"
    filled = text.count("#")
    clamped = min(1.0, max(0.0, fraction))
    assert filled == int(clamped * width + 1e-9)
    assert text[1:-1] == "#" * filled + "-" * (width - filled)


@given(st.text(max_size=80), st.integers(0, 60))
def test_clip_never_exceeds_the_width_and_keeps_short_text(text: str, width: int) -> None:
    out = cliformat.clip(text, width)
    assert len(out) <= width
    if len(text) <= width:
        assert out == text
    elif width > 0:
        assert out.endswith(cliformat.ELLIPSIS)
        assert text.startswith(out[:-1])


def test_seconds_formats_each_range_and_marks_unknowns() -> None:
    assert cliformat.seconds(None) == "?"
    assert cliformat.seconds(-1.0) == "?"
    assert cliformat.seconds(0.0) == "0.0s"
    assert cliformat.seconds(12.34) == "12.3s"
    assert cliformat.seconds(125.0) == "2m05s"
    assert cliformat.seconds(2 * 3600 + 3 * 60 + 10) == "2h03m"
    assert cliformat.prediction(0.0) == "?"
    assert cliformat.prediction(20.0) == "20.0s"


def test_enum_labels_handle_values_this_build_does_not_know() -> None:
    assert cliformat.tuning_label(pb.TUNING_RAISE_DOWNTIME) == "raise-downtime"
    assert cliformat.tuning_label(pb.TUNING_UNSPECIFIED) == "-"
    assert cliformat.tuning_label(99) == "tuning-99"
    assert cliformat.drain_state_label(pb.DRAIN_STATE_INCOMPLETE) == "incomplete"
    assert cliformat.drain_state_label(42) == "state-42"
    assert cliformat.phase_label(apb.MIGRATION_PHASE_POSTCOPY) == "postcopy"
    assert cliformat.event_label(77) == "EVENT_77"


def test_transferred_fraction_is_one_minus_remaining_over_total() -> None:
    p = apb.MigrationProgress(
        memory_total_bytes=4 * samples.GIB, memory_remaining_bytes=samples.GIB
    )
    assert cliformat.transferred_fraction(p) == 0.75
    # Remaining above total (a burst of dirtying) is not a negative share.
    p.memory_remaining_bytes = 5 * samples.GIB
    assert cliformat.transferred_fraction(p) == 0.0
    assert cliformat.transferred_fraction(apb.MigrationProgress()) == 0.0
    done = apb.MigrationProgress(phase=apb.MIGRATION_PHASE_COMPLETED)
    assert cliformat.transferred_fraction(done) == 1.0


# ---- plan --------------------------------------------------------------------------------


def test_plan_lists_migrations_in_order_with_unknowns_and_the_bound() -> None:
    plan = samples.plan()
    text = cliview.render_plan(plan)
    lines = text.splitlines()
    rows = [line for line in lines if line[:1].isdigit()]
    by_position = sorted(plan.migrations, key=lambda m: m.position)
    assert [row.split()[0] for row in rows] == [str(m.position) for m in by_position]
    web_row, db_row, batch_row = rows
    assert "web-1" in web_row and "(scheduler)" in web_row and WEB[:8] in web_row
    assert "compute-02" in db_row and "raise-downtime" in db_row
    assert f"{8:.1f}" in db_row.split() and f"{60:.1f}" in db_row.split()
    # No prediction: a question mark, never 0.
    assert batch_row.split()[5:7] == ["?", "?"]
    assert BATCH_NAME not in text and BATCH_NAME[:10] in batch_row
    assert "gpu-1" in text and "PCI passthrough 0000:3b:00.0" in text
    ratio = plan.predicted_makespan_s / plan.lower_bound_s
    assert lines[-1] == (
        f"predicted makespan {plan.predicted_makespan_s:.1f} s, "
        f"lower bound {plan.lower_bound_s:.1f} s, ratio {ratio:.2f}"
    )


def test_plan_shows_the_precopy_rounds_before_a_planned_postcopy() -> None:
    plan = samples.plan()
    db = next(m for m in plan.migrations if m.name == "db-1")
    db.tuning = pb.TUNING_POSTCOPY
    db.precopy_tries = 2
    (row,) = [line for line in cliview.render_plan(plan).splitlines() if "db-1" in line]
    assert "postcopy after 2 rounds" in row


def test_plan_without_migrations_or_bound() -> None:
    text = cliview.render_plan(pb.DrainPlan(host="empty-1"))
    assert "nothing to migrate" in text
    assert text.splitlines()[-1] == "predicted makespan ?, lower bound ?"
    assert "ratio" not in text


# ---- summary, status, agents -------------------------------------------------------------


def test_summary_shows_predicted_against_actual_per_vm_and_overall() -> None:
    status = samples.final_status(pb.DRAIN_STATE_INCOMPLETE)
    db = next(v for v in status.vms if v.vm_uuid == DB)
    db.revised_total_s, db.revised_note = 31.2, "3 more rounds"
    text = cliview.render_summary(status)
    assert text.splitlines()[0] == f"drain {status.drain_id} of {status.host}: incomplete"
    db_row = next(line for line in text.splitlines() if line.startswith("db-1"))
    assert db_row.split()[4:9] == [
        f"{db.predicted_total_s:.1f}",
        "31.2",  # revised from its own rounds
        f"{db.actual_total_s:.1f}",
        str(db.predicted_downtime_ms),
        str(db.actual_downtime_ms),
    ]
    assert "raise-downtime: max_downtime_ms=2000" in db_row
    batch = next(v for v in status.vms if v.vm_uuid == BATCH)
    assert f"{BATCH_NAME}: {batch.error}" in text  # the error in full under the table
    s = status.summary
    change = (s.actual_makespan_s - s.predicted_makespan_s) / s.predicted_makespan_s * 100
    assert f"({change:+.0f}%)" in text
    assert (
        f"max downtime: {s.max_downtime_ms} ms (limit {status.policy.max_downtime_ms} ms)" in text
    )
    assert (
        f"migrated {s.migrated}, failed {s.failed}, unmovable {s.unmovable}, "
        f"post-copy used {s.postcopy_used}"
    ) in text


def test_status_of_a_running_drain_counts_states_and_elapsed_from_now() -> None:
    status = samples.running_status()
    text = cliview.render_status(status, now=T0 + 125)
    assert "running" in text.splitlines()[0]
    assert "elapsed 2m05s" in text
    assert "1 completed, 1 migrating, 1 queued" in text
    assert "predicted makespan" in text
    assert "reason: BIOS update" in text


def test_status_of_a_finished_drain_uses_its_end_not_now() -> None:
    status = samples.final_status(pb.DRAIN_STATE_COMPLETED)
    text = cliview.render_status(status, now=T0 + 10_000)
    assert f"elapsed {cliformat.seconds(74.2)}" in text
    assert "migrated 3, failed 0" in text


def test_agents_table_sorted_with_missing_reports() -> None:
    text = cliview.render_agents(samples.agents(), now=T0)
    header, first, second = text.splitlines()
    assert header.split()[:3] == ["host", "address", "health"]
    assert first.startswith("compute-02") and "UNREACHABLE" in first
    assert "failed to connect to all addresses" in first
    assert "30.0s ago" in first
    assert second.startswith("compute-07") and "QEMU 7.2.0" in second
    assert "4/5" in second and "64.0/256.0 GiB" in second
    assert cliview.render_agents(pb.ListAgentsResponse(), now=T0) == "no agents"


# ---- event lines -------------------------------------------------------------------------


def test_every_event_gives_one_line_naming_its_kind() -> None:
    for ev in samples.events():
        line = cliview.render_event_line(ev)
        assert "\n" not in line
        assert cliformat.event_label(ev.kind) in line


def test_progress_line_has_percent_iteration_and_who_set_the_limit() -> None:
    ev = until(E.DRAIN_EVENT_KIND_PROGRESS)[-1]
    p = ev.progress
    line = cliview.render_event_line(ev)
    pct = (p.memory_total_bytes - p.memory_remaining_bytes) / p.memory_total_bytes * 100
    assert f"precopy {pct:.0f}% iter {p.iteration}" in line
    assert f"limit {p.max_downtime_ms} ms by {p.max_downtime_set_by}" in line


# ---- the live view -----------------------------------------------------------------------


def test_planned_event_queues_every_planned_vm_but_not_the_unmovable() -> None:
    view = fold(until(E.DRAIN_EVENT_KIND_PLANNED))
    assert [r.vm_uuid for r in view.rows] == [WEB, DB, BATCH]  # plan position order
    assert all(r.state == pb.VM_STATE_QUEUED for r in view.rows)
    view = fold(until(E.DRAIN_EVENT_KIND_BLOCKED))
    assert GPU not in {r.vm_uuid for r in view.rows}
    assert view.unmovable == 1


def test_live_view_mid_drain() -> None:
    events = until(E.DRAIN_EVENT_KIND_PROGRESS, nth=3)  # db-1 after its tuning
    view = fold(events)
    now = T0 + 30.0
    frame = clilive.render_live(view, now, width=120, height=30)
    head, overall = frame.splitlines()[:2]
    assert head.startswith(f"drain of {samples.HOST} ({samples.DRAIN_ID[:8]}): running")
    assert "1/3 VMs done" in head and "2 migrating" in head and "1 unmovable" in head
    assert f"elapsed {cliformat.seconds(30.0)} / predicted {cliformat.seconds(61.5)}" in overall
    assert " 33% " in overall

    db = row_line(frame, "db-1")
    p = events[-1].progress
    pct = (p.memory_total_bytes - p.memory_remaining_bytes) / p.memory_total_bytes * 100
    assert f"{pct:3.0f}%" in db
    assert f"it {p.iteration}" in db
    # Elapsed: QEMU's job time at the sample plus the time since the sample.
    sampled = p.sampled_at.seconds + p.sampled_at.nanos / 1e9
    assert f"{cliformat.seconds(p.elapsed_ms / 1000 + now - sampled)}/28.0s" in db
    assert "limit 2000 ms (hostmaint)" in db
    web = row_line(frame, "web-1")
    assert "done" in web and "100%" in web and "dt 171 ms (pred 150)" in web
    # Started, no sample yet: elapsed since its start, prediction unknown.
    batch = row_line(frame, BATCH_NAME[:4])
    assert "starting" in batch and "  -% " in batch and f"{cliformat.seconds(6.0)}/?" in batch
    assert "  tuned db-1: max_downtime_ms=2000" in frame.splitlines()


def test_bars_line_up_whatever_the_row_state() -> None:
    frame = clilive.render_live(fold(samples.events()), T0 + 80, width=120, height=30)
    rows = [line for line in frame.splitlines()[2:] if "[" in line]
    assert len(rows) == 3
    assert len({line.index("[") for line in rows}) == 1
    assert len({line.index("]") for line in rows}) == 1


def test_finished_view_shows_the_failed_vm_and_the_final_state() -> None:
    view = fold(samples.events())
    assert view.finished and view.state == pb.DRAIN_STATE_INCOMPLETE
    frame = clilive.render_live(view, T0 + 500, width=160, height=30)
    assert "incomplete" in frame.splitlines()[0]
    # The drain's elapsed time stops at its end.
    assert f"elapsed {cliformat.seconds(74.2)}" in frame
    batch = row_line(frame, BATCH_NAME[:4])
    assert "failed" in batch and "error: migration did not converge" in batch
    # The second attempt ran from its start to its failure.
    assert f"{cliformat.seconds(74.0 - 51.5)}/?" in batch


def test_retry_clears_the_failure_until_the_next_attempt_ends() -> None:
    view = fold(until(E.DRAIN_EVENT_KIND_RETRIED))
    batch = next(r for r in view.rows if r.vm_uuid == BATCH)
    assert batch.state == pb.VM_STATE_QUEUED and batch.error == "" and batch.progress is None
    assert batch.attempts == 2
    assert any(n.startswith(f"retrying {BATCH_NAME}") for n in view.notes)


def test_a_skewed_local_clock_does_not_skew_elapsed_times() -> None:
    skew_s = 3600.0  # the local clock runs an hour ahead of the coordinator's
    events = until(E.DRAIN_EVENT_KIND_MIGRATION_STARTED, nth=3)
    view = fold(events, delay_s=skew_s)
    frame = clilive.render_live(view, T0 + 30 + skew_s, width=120)
    assert f"elapsed {cliformat.seconds(30.0)}" in frame
    # A replayed old event (received late) does not move the offset.
    replay = clilive.apply(view, events[0], T0 + 30 + skew_s)
    assert replay.clock_offset_s == view.clock_offset_s


def test_unknown_predictions_and_an_empty_drain() -> None:
    frame = clilive.render_live(clilive.LiveView(host="h1"), now=T0, width=80)
    head, overall = frame.splitlines()
    assert "0/0 VMs done" in head
    assert "elapsed ? / predicted ?" in overall


def test_height_keeps_running_migrations_and_drops_old_finished_ones() -> None:
    plan = pb.DrainPlan(
        host="h1",
        migrations=[
            pb.PlannedMigration(
                vm_uuid=f"{i:08d}-0000", name=f"vm-{i}", position=i, predicted_total_s=10
            )
            for i in range(30)
        ],
    )
    events = [samples.event(E.DRAIN_EVENT_KIND_PLANNED, T0, plan=plan)]
    for i in range(30):
        uuid = f"{i:08d}-0000"
        events.append(samples.event(E.DRAIN_EVENT_KIND_MIGRATION_STARTED, T0 + i, vm_uuid=uuid))
        if i < 25:
            events.append(
                samples.event(
                    E.DRAIN_EVENT_KIND_MIGRATION_COMPLETED,
                    T0 + i + 1,
                    vm_uuid=uuid,
                    vm=pb.VmStatus(vm_uuid=uuid, actual_total_s=1, actual_downtime_ms=100),
                )
            )
    height = 12
    frame = clilive.render_live(fold(events), T0 + 40, width=100, height=height)
    lines = frame.splitlines()
    assert len(lines) <= height
    shown = [line.split()[0] for line in lines[2:] if line.startswith("  vm-")]
    assert shown[-5:] == [f"vm-{i}" for i in range(25, 30)]  # every running one
    hidden = 30 - len(shown)
    assert f"  ({hidden} more finished)" in lines
    assert shown[0] == f"vm-{25 - (len(shown) - 5)}"  # the newest finished ones kept


names = st.text(alphabet=st.characters(codec="ascii", categories=("L", "N", "P")), max_size=90)


@given(st.integers(0, 300), st.lists(names, min_size=1, max_size=6), st.integers(1, 1000))
def test_no_line_of_the_live_view_wraps(width: int, vm_names: list[str], iteration: int) -> None:
    plan = pb.DrainPlan(
        host="h" * 70,
        predicted_makespan_s=1e6,
        migrations=[
            pb.PlannedMigration(vm_uuid=f"u{i}", name=n, position=i, predicted_total_s=i * 1e5)
            for i, n in enumerate(vm_names)
        ],
    )
    events = [
        samples.event(E.DRAIN_EVENT_KIND_STARTED, T0),
        samples.event(E.DRAIN_EVENT_KIND_PLANNED, T0, plan=plan),
    ]
    for i, _ in enumerate(vm_names):
        events.append(samples.event(E.DRAIN_EVENT_KIND_MIGRATION_STARTED, T0, vm_uuid=f"u{i}"))
        events.append(
            samples.event(
                E.DRAIN_EVENT_KIND_PROGRESS,
                T0 + 1,
                vm_uuid=f"u{i}",
                progress=samples.progress(
                    f"u{i}", T0 + 1, iteration=iteration, memory_total_bytes=10, elapsed_ms=10**9
                ),
            )
        )
    frame = clilive.render_live(fold(events), T0 + 1e5, width=width, height=50)
    assert all(len(line) < max(40, width) for line in frame.splitlines())


def test_redraw_moves_up_over_the_previous_frame() -> None:
    assert clilive.redraw(0, "a\nb") == "\x1b[Ja\nb\n"
    assert clilive.redraw(2, "c") == "\x1b[2F\x1b[Jc\n"
    assert clilive.frame_height("a\nb\nc") == 3


def test_plan_shows_a_missed_deadline_and_the_warnings() -> None:
    plan = pb.DrainPlan(
        host="busy-1",
        predicted_makespan_s=900.0,
        lower_bound_s=600.0,
        deadline_s=720.0,
        warnings=["the predicted makespan 900 s exceeds the deadline 720 s"],
    )
    lines = cliview.render_plan(plan).splitlines()
    assert lines[-2].endswith("deadline 720 s (missed)")
    assert lines[-1] == "warning: the predicted makespan 900 s exceeds the deadline 720 s"


def test_plan_lists_cold_migrations_apart_from_the_unmovable() -> None:
    plan = pb.DrainPlan(
        host="h1",
        unmovable=[pb.UnmovableVm(vm_uuid="1" * 32, name="gpu", reason="PCI device")],
        cold_migrations=[pb.ColdMigration(vm_uuid="2" * 32, name="off", reason="shutoff")],
    )
    text = cliview.render_plan(plan)
    assert text.splitlines()[0] == "plan for h1: 0 to migrate, 1 unmovable, 1 to cold-migrate"
    cold = text[text.index("cold migrations") :]
    assert "off" in cold and "(scheduler)" in cold and "gpu" not in cold


def test_plan_and_live_view_show_what_the_plan_left_out() -> None:
    note = "vCPU throttling left out of the escalation ladder: the source host cannot do it (x)"
    plan = pb.DrainPlan(host="h1", predicted_makespan_s=10.0, notes=[note])
    assert cliview.render_plan(plan).splitlines()[-1] == f"note: {note}"
    view = fold([samples.event(E.DRAIN_EVENT_KIND_PLANNED, T0, plan=plan)])
    assert view.notes == (note,)


def test_a_broken_postcopy_shows_paused_then_stranded_with_where_it_is() -> None:
    events = until(E.DRAIN_EVENT_KIND_PLANNED)
    at = T0 + 10
    why = "post-copy to compute-05 broke: paused on compute-07, waiting on compute-05"
    events += [
        samples.event(
            E.DRAIN_EVENT_KIND_MIGRATION_STARTED,
            at,
            vm_uuid=WEB,
            vm=samples.vm(WEB, pb.VM_STATE_MIGRATING, started_at=samples.ts(at)),
        ),
        samples.event(
            E.DRAIN_EVENT_KIND_POSTCOPY_PAUSED,
            at + 5,
            vm_uuid=WEB,
            message=why,
            vm=samples.vm(WEB, pb.VM_STATE_POSTCOPY_PAUSED, error=why),
        ),
        samples.event(
            E.DRAIN_EVENT_KIND_PROGRESS,
            at + 6,
            vm_uuid=WEB,
            vm=samples.vm(WEB, pb.VM_STATE_POSTCOPY_PAUSED, error=why),
            progress=samples.progress(
                WEB, at + 6, phase=apb.MIGRATION_PHASE_POSTCOPY_PAUSED, elapsed_ms=6000
            ),
        ),
    ]
    view = fold(events)
    frame = clilive.render_live(view, at + 7, width=160, height=30)
    assert "POSTCOPY-PAUSED" in row_line(frame, "web")
    assert "PAUSED web-1: post-copy to compute-05 broke" in frame and "compute-05 broke" in frame
    left = "web runs nowhere: its vCPUs ... on compute-05, the pages not yet copied on compute-07"
    stranded = samples.event(
        E.DRAIN_EVENT_KIND_STRANDED,
        at + 60,
        vm_uuid=WEB,
        message=left,
        vm=samples.vm(WEB, pb.VM_STATE_STRANDED, error=left),
    )
    view = clilive.apply(view, stranded, at + 60)
    frame = clilive.render_live(view, at + 61, width=200, height=30)
    assert "STRANDED" in row_line(frame, "web")
    assert "STRANDED web-1: web runs nowhere" in frame and "1 STRANDED" in frame
    line = cliview.render_event_line(stranded)
    assert "STRANDED" in line and "compute-07" in line
    status = samples.final_status()
    status.vms[0].CopyFrom(samples.vm(WEB, pb.VM_STATE_STRANDED, error=left))
    status.summary.stranded = 1
    assert "STRANDED 1: their post-copy broke" in cliview.render_summary(status)
    assert left in cliview.render_summary(status)


def test_live_view_shows_the_prediction_revised_from_the_rounds() -> None:
    events = until(E.DRAIN_EVENT_KIND_PROGRESS, nth=3)  # db-1 migrating
    revised = pb.DrainEvent()
    revised.CopyFrom(events[-1])
    revised.vm.revised_total_s, revised.vm.revised_note = 41.5, "6 more rounds"
    frame = clilive.render_live(fold([*events, revised]), T0 + 30.0, width=120, height=30)
    assert "rev 41.5s, limit 2000 ms" in row_line(frame, "db-1")
    stuck = pb.DrainEvent()
    stuck.CopyFrom(revised)
    stuck.vm.revised_total_s = 0.0
    stuck.vm.revised_note = "will not converge as it runs: its rounds stop shrinking"
    frame = clilive.render_live(fold([*events, revised, stuck]), T0 + 31.0, width=120, height=30)
    assert "rev never, limit 2000 ms" in row_line(frame, "db-1")


def test_summary_shows_the_time_before_the_first_migration_apart_from_the_migrations() -> None:
    status = pb.DrainStatus(drain_id="d", host="h0")
    status.started_at.FromSeconds(1_000)
    status.summary.predicted_makespan_s = 20.0
    status.summary.actual_makespan_s = 40.0
    status.plan.notes.append("measured the dirty rates of 3 VMs in 15.2s")
    for start, end in ((1_016, 1_030), (1_018, 1_038)):
        vm = status.vms.add(name=f"vm{start}", state=pb.VM_STATE_COMPLETED)
        vm.started_at.FromSeconds(start)
        vm.finished_at.FromSeconds(end)
    assert cliview.migration_window(status) == (16.0, 22.0)
    text = cliview.render_summary(status)
    assert "before the first migration: 16.0s (measured the dirty rates of 3 VMs in 15.2s)" in (
        text
    )
    assert "migrations: predicted 20.0s, took 22.0s (+10%)" in text
    assert cliview.migration_window(pb.DrainStatus()) is None  # nothing ran yet
    assert cliview.window_lines(pb.DrainStatus()) == []
