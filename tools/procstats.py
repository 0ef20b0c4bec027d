"""What the load benchmarks measure of a process: peak RSS, CPU seconds, percentiles."""

from __future__ import annotations

import threading
from pathlib import Path

import psutil


class PeakSampler:
    """A process's peak RSS, sampled (and read from the kernel's high-water mark)."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.peak_rss = 0
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval_s)

    def sample(self) -> None:
        try:
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss, self._hwm())
        except psutil.Error:
            pass  # the process ended: keep the last peak

    def _hwm(self) -> int:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def cpu_s(self) -> float:
        t = self.process.cpu_times()
        return float(t.user + t.system)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]
