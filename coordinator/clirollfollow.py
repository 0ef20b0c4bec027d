"""Following a roll from the CLI: one line per event, a live table on a terminal, or JSON
Lines; Ctrl-C detaches (the roll goes on on the coordinator)."""

from __future__ import annotations

import json
import queue
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import grpc

from hostmaint.coordinator import clilive, cliroll
from hostmaint.coordinator.client import (
    EXIT_CANCELLED,
    EXIT_DETACHED,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    pump_stream,
    rpc_error,
    to_json,
)
from hostmaint.protos import coordinator_pb2 as pb

PROG = "hostmaint"
EXIT_BY_ROLL_STATE = {
    pb.ROLL_STATE_COMPLETED: EXIT_OK,
    pb.ROLL_STATE_STOPPED: EXIT_INCOMPLETE,
    pb.ROLL_STATE_FAILED: EXIT_FAILED,
    pb.ROLL_STATE_CANCELLED: EXIT_CANCELLED,
}
_ENDS = (pb.ROLL_EVENT_KIND_FINISHED, pb.ROLL_EVENT_KIND_STOPPED)
_LAST_EVENTS = 6


class _End:
    pass


class RollFollower:
    def __init__(self, *, as_json: bool, live: bool, out: TextIO | None = None) -> None:
        self.as_json = as_json
        self.live = live
        self.out = out or sys.stdout
        self.roll_id = ""
        self.rows: dict[str, tuple[int, str, str]] = {}
        self.last: list[str] = []
        self.drawn = 0

    def run(self, start: Callable[[], Iterator[pb.RollEvent]]) -> int:
        items: queue.Queue[pb.RollEvent | grpc.RpcError | _End] = queue.Queue()
        call: Any = None
        try:
            call = start()
            threading.Thread(
                target=pump_stream, args=(call, items, _End()), name="roll-events", daemon=True
            ).start()
            while True:
                item = items.get()
                if isinstance(item, grpc.RpcError):
                    code, text = rpc_error(item)
                    sys.stderr.write(f"{PROG}: {text}\n")
                    return code
                if isinstance(item, _End):
                    sys.stderr.write(
                        f"{PROG}: the event stream ended before the roll did; follow it with: "
                        f"{PROG} roll-status {self.roll_id}\n"
                    )
                    return EXIT_ERROR
                self._show(item)
                if item.kind in _ENDS:
                    if not self.as_json:
                        self.out.write("\n" + cliroll.render_roll_status(item.status) + "\n")
                        self.out.flush()
                    return EXIT_BY_ROLL_STATE.get(item.status.state, EXIT_ERROR)
        except KeyboardInterrupt:
            if call is not None:
                call.cancel()
            sys.stderr.write(
                f"{PROG}: detached; the roll continues on the coordinator. "
                f"Follow it with: {PROG} roll-status {self.roll_id}\n"
            )
            return EXIT_DETACHED

    def _show(self, event: pb.RollEvent) -> None:
        self.roll_id = self.roll_id or event.roll_id
        line = cliroll.render_roll_event_line(event)
        if self.as_json:
            self.out.write(json.dumps(to_json(event), sort_keys=True) + "\n")
        elif self.live:
            self._track(event, line)
            width = shutil.get_terminal_size().columns
            frame = cliroll.render_roll_live(self.rows, self.last, width)
            self.out.write(clilive.redraw(self.drawn, frame))
            self.drawn = clilive.frame_height(frame)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def _track(self, event: pb.RollEvent, line: str) -> None:
        if event.kind == pb.ROLL_EVENT_KIND_PLANNED:
            for w in event.plan.waves:
                for h in w.hosts:
                    self.rows.setdefault(h.host, (w.index, "pending", ""))
        if event.host and event.host in self.rows:
            wave = self.rows[event.host][0]
            self.rows[event.host] = (wave, cliroll.event_label(event.kind), event.message)
        self.last = [*self.last, line][-_LAST_EVENTS:]
