"""The operator's hook of a roll: one command per host, run with a timeout, output kept.

The hook is the name of an executable in the coordinator's `[roll] hook_dir` and its
arguments; the host's name is appended as the last argument. It runs without a shell,
in its own process group (killed whole on timeout), with `HOSTMAINT_ROLL_ID` and
`HOSTMAINT_HOST` in its environment. Only what the directory holds can run: a client
of the API names a hook, it cannot hand the coordinator a command line of its own.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hostmaint.coordinator import errors

OUTPUT_KEPT_CHARS = 4096


@dataclass(frozen=True)
class HookResult:
    exit_code: int  # -1: it did not start; -9 and the like: killed by that signal
    output: str  # stdout and stderr, the last OUTPUT_KEPT_CHARS characters
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def hook_argv(hook: str, hook_dir: str) -> list[str]:
    """The hook's command line (without the host); InvalidArgument or PreconditionFailed
    when it cannot run."""
    try:
        words = shlex.split(hook)
    except ValueError as e:
        raise errors.InvalidArgument("hook", f"cannot be split into words: {e}") from e
    if not words:
        raise errors.InvalidArgument("hook", "is empty")
    name = words[0]
    if "/" in name or name in (".", ".."):
        raise errors.InvalidArgument("hook", f"{name!r} must be a file name in [roll] hook_dir")
    if not hook_dir:
        raise errors.PreconditionFailed("roll hook", "the coordinator has no [roll] hook_dir")
    path = Path(hook_dir) / name
    if not path.is_file() or not os.access(path, os.X_OK):
        raise errors.PreconditionFailed(
            "roll hook", f"{name!r} is not an executable file in {hook_dir}"
        )
    return [str(path), *words[1:]]


def run_hook(argv: list[str], timeout_s: float, env: dict[str, str]) -> HookResult:
    """Runs the hook to its end or its timeout (then kills its process group)."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    except OSError as e:
        return HookResult(-1, f"cannot run {argv[0]}: {e}")
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        timed_out = True
    text = out.decode("utf-8", "replace")[-OUTPUT_KEPT_CHARS:]
    return HookResult(proc.returncode, text, timed_out)
