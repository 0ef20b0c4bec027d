"""A roll's journal rows as the protobuf messages its RPCs answer and store.

The translation only: the states, the stored request, a host's targets, timestamps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from google.protobuf import json_format

from hostmaint.coordinator import views
from hostmaint.coordinator.rolljournal import RollHostRow, RollHostState, RollRow, RollState
from hostmaint.protos import coordinator_pb2 as cpb

ROLL_STATES = {
    RollState.RUNNING: cpb.ROLL_STATE_RUNNING,
    RollState.STOPPED: cpb.ROLL_STATE_STOPPED,
    RollState.CANCELLING: cpb.ROLL_STATE_CANCELLING,
    RollState.COMPLETED: cpb.ROLL_STATE_COMPLETED,
    RollState.CANCELLED: cpb.ROLL_STATE_CANCELLED,
    RollState.FAILED: cpb.ROLL_STATE_FAILED,
}
HOST_STATES = {
    RollHostState.PENDING: cpb.ROLL_HOST_STATE_PENDING,
    RollHostState.DRAINING: cpb.ROLL_HOST_STATE_DRAINING,
    RollHostState.HOOK_RUNNING: cpb.ROLL_HOST_STATE_HOOK_RUNNING,
    RollHostState.WAITING: cpb.ROLL_HOST_STATE_WAITING,
    RollHostState.DONE: cpb.ROLL_HOST_STATE_DONE,
    RollHostState.FAILED: cpb.ROLL_HOST_STATE_FAILED,
    RollHostState.SKIPPED: cpb.ROLL_HOST_STATE_SKIPPED,
}
# The host states a roll is done with.
ENDED = (RollHostState.DONE, RollHostState.SKIPPED)


def request_to_json(request: cpb.RollRequest) -> str:
    return json_format.MessageToJson(request, sort_keys=True)


def request_from_json(text: str) -> cpb.RollRequest:
    return json_format.Parse(text, cpb.RollRequest())


def targets_json(targets: dict[str, str]) -> str:
    return json.dumps(targets, sort_keys=True)


def set_ts(msg: object, name: str, epoch_s: float | None) -> None:
    ts = views.timestamp(epoch_s)
    if ts is not None:
        getattr(msg, name).CopyFrom(ts)


def status_to_pb(roll: RollRow, hosts: Sequence[RollHostRow]) -> cpb.RollStatus:
    """A roll's journal rows as the RollStatus the RPCs answer."""
    request = request_from_json(roll.request)
    out = cpb.RollStatus(
        roll_id=roll.id,
        state=ROLL_STATES[roll.state],
        hook=request.hook,
        message=roll.message,
        reason=request.reason,
    )
    if roll.plan:
        json_format.Parse(roll.plan, out.plan)
    set_ts(out, "started_at", roll.created_at)
    set_ts(out, "finished_at", roll.finished_at)
    waves = [h.wave for h in hosts if h.state not in ENDED]
    out.current_wave = min(waves) if waves else 0
    for h in hosts:
        hs = out.hosts.add(
            host=h.host,
            wave=h.wave,
            state=HOST_STATES[h.state],
            step=h.step,
            drain_id=h.drain_id,
            error=h.error,
            hook_exit_code=h.hook_exit_code if h.hook_exit_code is not None else 0,
            hook_output=h.hook_output,
            versions_before=h.versions_before,
            versions_after=h.versions_after,
            predicted_s=h.predicted_s,
        )
        for name in ("hook_started_at", "hook_finished_at", "started_at", "finished_at"):
            set_ts(hs, name, getattr(h, name))
    return out
