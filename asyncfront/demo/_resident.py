"""The process's resident memory, sampled while the demo runs (Linux ``/proc``)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

__all__ = ("ResidentMemory", "ResidentSampler", "resident_bytes")

_STATM = "/proc/self/statm"


def resident_bytes() -> int | None:
    """The process's resident set size now, in bytes; None where ``/proc`` is missing."""
    try:
        with open(_STATM, encoding="ascii") as statm:
            fields = statm.read().split()
    except OSError:
        return None
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ResidentMemory:
    """What the sampler saw: the baseline and the highest sample, in bytes."""

    baseline: int
    """The resident set when sampling began (after imports, before any model loads)."""
    peak: int
    """The highest resident set sampled."""
    samples: int
    interval: float
    """Seconds between samples."""

    @property
    def above_baseline(self) -> int:
        """How far the peak rose above the baseline."""
        return max(0, self.peak - self.baseline)


class ResidentSampler:
    """A thread sampling the resident set every ``interval`` seconds until stopped.

    Reading ``/proc/self/statm`` takes microseconds and holds the GIL only that long,
    so sampling does not slow the work it watches.
    """

    def __init__(self, interval: float = 0.02) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.interval = interval
        self._baseline = resident_bytes()
        self._peak = self._baseline or 0
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="asyncfront-demo-rss", daemon=True)

    @property
    def available(self) -> bool:
        """Whether this platform reports the resident set (Linux does)."""
        return self._baseline is not None

    def start(self) -> ResidentSampler:
        """Begin sampling (nothing happens where the resident set is not reported)."""
        if self.available:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        now = resident_bytes()
        if now is not None:
            self._samples += 1
            self._peak = max(self._peak, now)

    def stop(self) -> ResidentMemory | None:
        """Stop sampling, take a last sample, and say what was seen (None if unavailable)."""
        if not self.available:
            return None
        self._stop.set()
        self._thread.join()
        self._sample()
        assert self._baseline is not None
        return ResidentMemory(self._baseline, self._peak, self._samples, self.interval)
