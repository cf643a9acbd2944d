"""A one-line progress report on stderr for streams of unknown length (counts, rate, elapsed time).

Self-written so that fastlm needs no extra dependency. On a terminal the line is redrawn at most a few times a
second; elsewhere (logs, CI) a line is written every half minute of long work, and the final one by `close()`.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_INTERVAL_S = 0.2
LOG_INTERVAL_S = 30.0


class Progress:
    """Counts named quantities, e.g. `Progress("prepare", ("sentences", "tokens"))`, `update(sentences=n, ...)`."""

    def __init__(self, label: str, units: tuple[str, ...], *, enabled: bool = True, stream: TextIO | None = None):
        self.label, self.enabled = label, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.counts = dict.fromkeys(units, 0)
        self._start = self._last_draw = time.perf_counter()
        self._live = enabled and self.stream.isatty()

    def update(self, **increments: int) -> None:
        for unit, amount in increments.items():
            self.counts[unit] += amount
        now = time.perf_counter()
        if self.enabled and now - self._last_draw >= (REDRAW_INTERVAL_S if self._live else LOG_INTERVAL_S):
            self._last_draw = now
            self.stream.write("\r" + self._line(now) if self._live else self._line(now) + "\n")
            self.stream.flush()

    def reached(self, **totals: int) -> None:
        """`update` with the counts so far instead of increments."""
        self.update(**{unit: total - self.counts[unit] for unit, total in totals.items()})

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self._live else "") + self._line(time.perf_counter()) + "\n")
            self.stream.flush()

    def _line(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        first_unit = next(iter(self.counts))
        counts = " ".join(f"{count:,} {unit}" for unit, count in self.counts.items())
        return f"{self.label}: {counts} ({self.counts[first_unit] / elapsed:,.0f} {first_unit}/s, {elapsed:.1f} s)"
