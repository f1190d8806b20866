"""A plain-stderr progress bar for meta-training (no dependency beyond the standard library).

On a terminal it redraws one line (``\\r``) at most every ``interval_s``; elsewhere (CI, log files,
``ray job`` output) it prints a full line every ``log_interval_s`` and at the end.

The remaining time is extrapolated from the steps after the first one this process ran: the first
step also pays for starting the workers and building their tasks, so counting it would predict
a one-minute run to take many minutes.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar:
    """Shows step, meta-loss, validation and inner optimizee steps per second (mean)."""

    def __init__(
        self,
        total: int,
        *,
        start: int = 0,
        stream: TextIO | None = None,
        interval_s: float = 0.2,
        log_interval_s: float = 10.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.start_step = start
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if self.tty else log_interval_s
        self.enabled = enabled
        self.validation: str = "-"
        self.clock = clock
        self._started = clock()
        self._first: tuple[int, float] | None = None  # (step, time) of the first update
        self._last_draw = -math.inf
        self._line = ""
        self._inner_steps = 0

    def set_validation(self, loss: float, best: float) -> None:
        self.validation = f"{loss:.4f} (best {best:.4f})"

    def render(self, step: int, meta_loss: float, inner_steps_per_s: float) -> str:
        """The bar's text; the rate shown is the mean since this process started."""
        fraction = step / self.total if self.total else 1.0
        filled = int(round(BAR_WIDTH * fraction))
        eta = math.nan if step < self.total else 0.0
        if self._first is not None and step > self._first[0]:
            first_step, first_at = self._first
            per_step = (self.clock() - first_at) / (step - first_step)
            eta = per_step * (self.total - step)
        return (
            f"step {step}/{self.total} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            f"meta-loss {meta_loss:.4f} | val {self.validation} | "
            f"{inner_steps_per_s:,.0f} inner steps/s | eta {_duration(eta)}"
        )

    def update(self, step: int, meta_loss: float, inner_steps: int) -> None:
        """Records a finished meta-step that consumed ``inner_steps`` optimizee steps."""
        self._inner_steps += inner_steps
        now = self.clock()
        if self._first is None:
            self._first = (step, now)
        if not self.enabled:
            return
        if now - self._last_draw < self.interval_s and step < self.total:
            return
        self._last_draw = now
        rate = self._inner_steps / max(now - self._started, 1e-9)
        self._line = self.render(step, meta_loss, rate)
        if self.tty:
            self.stream.write("\r\033[K" + self._line)
        else:
            self.stream.write(self._line + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """Prints a message on its own line without breaking the bar."""
        if self.tty and self._line:
            self.stream.write("\r\033[K" + message + "\n" + self._line)
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._line:
            self.stream.write("\n")
            self.stream.flush()
        self._line = ""
