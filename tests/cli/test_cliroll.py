"""The roll's views: the live table and the follower's exit codes."""

from __future__ import annotations

import io

from hostmaint.coordinator import cli, cliroll
from hostmaint.coordinator.clirollfollow import RollFollower
from hostmaint.protos import coordinator_pb2 as pb


def events() -> list[pb.RollEvent]:
    plan = pb.RollPlan(vm_count=1, moves_per_vm=1.0, predicted_s=12.0)
    wave = plan.waves.add(index=1, predicted_drain_s=10.0, predicted_s=12.0)
    wave.hosts.add(host="h1").moves.add(vm_uuid="u", vm_name="vm1", target_host="h2", nth=1)
    stopped = pb.RollStatus(roll_id="r1", state=pb.ROLL_STATE_STOPPED, plan=plan)
    stopped.hosts.add(
        host="h1", wave=1, state=pb.ROLL_HOST_STATE_FAILED, step="hook", error="exit 3"
    )
    return [
        pb.RollEvent(roll_id="r1", kind=pb.ROLL_EVENT_KIND_PLANNED, plan=plan),
        pb.RollEvent(roll_id="r1", kind=pb.ROLL_EVENT_KIND_HOOK_STARTED, host="h1", wave=1),
        pb.RollEvent(
            roll_id="r1", kind=pb.ROLL_EVENT_KIND_HOST_FAILED, host="h1", message="exit 3"
        ),
        pb.RollEvent(roll_id="r1", kind=pb.ROLL_EVENT_KIND_STOPPED, status=stopped),
    ]


def test_the_live_table_shows_each_host_and_a_stopped_roll_exits_6() -> None:
    out = io.StringIO()
    code = RollFollower(as_json=False, live=True, out=out).run(lambda: iter(events()))
    assert code == cli.EXIT_INCOMPLETE
    text = out.getvalue()
    assert "HOST  WAVE  STATE" in text
    assert "h1       1  host failed  exit 3" in text
    assert "resume with: hostmaint roll-resume r1" in text


def test_the_plan_names_each_move_and_the_prediction() -> None:
    text = cliroll.render_roll_plan(events()[0].plan)
    assert text.startswith(
        "roll of 1 hosts in 1 waves: 1 VMs, 1 moves (1.00 per VM), predicted 12.0s"
    )
    assert "wave 1: h1  drain 10.0s, wave 12.0s" in text
    assert "h1    vm1  h2         1" in text
