"""A one-line progress meter on stderr (docs/s, tokens/s, ETA) with no dependencies."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Rate-limited progress line; the ETA is estimated from processed vs. total input bytes.

    Args:
        total_bytes: total input size (0 or None: no percentage/ETA).
        label: prefix of the line.
        enabled: False makes every call a no-op.
        min_interval_s: minimum time between two redraws.
        stream: output stream (default ``sys.stderr``).
    """

    def __init__(
        self,
        total_bytes: Optional[int],
        label: str = "",
        enabled: bool = True,
        min_interval_s: float = 0.5,
        stream: Optional[TextIO] = None,
    ) -> None:
        self.total_bytes = total_bytes or 0
        self.label = label
        self.enabled = enabled
        self.min_interval_s = min_interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.docs = self.tokens = self.bytes = 0
        self._start = time.monotonic()
        self._last_draw = 0.0
        # Carriage-return redraws only make sense on a terminal; logs get one line per update.
        self._end = "\r" if getattr(self.stream, "isatty", lambda: False)() else "\n"

    def update(self, docs: int, tokens: int, num_bytes: int) -> None:
        """Add processed counts and redraw if ``min_interval_s`` has passed."""
        self.docs += docs
        self.tokens += tokens
        self.bytes += num_bytes
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= self.min_interval_s:
            self._last_draw = now
            self._draw(now, self._end)

    def line(self, now: Optional[float] = None) -> str:
        """The current progress line (without line ending)."""
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        parts = [
            self.label,
            f"{self.docs} docs",
            f"{self.tokens} tokens",
            f"{self.docs / elapsed:.0f} docs/s",
            f"{self.tokens / elapsed:.0f} tokens/s",
            f"elapsed {_fmt_duration(elapsed)}",
        ]
        if self.total_bytes:
            frac = min(self.bytes / self.total_bytes, 1.0)
            eta = elapsed * (1.0 - frac) / frac if frac > 0 else float("nan")
            eta_str = _fmt_duration(eta) if eta == eta else "?"
            parts.insert(1, f"{100.0 * frac:5.1f}%")
            parts.append(f"ETA {eta_str}")
        return " | ".join(p for p in parts if p)

    def _draw(self, now: float, end: str) -> None:
        self.stream.write(self.line(now) + end)
        self.stream.flush()

    def close(self) -> None:
        """Draw the final line."""
        if self.enabled:
            self._draw(time.monotonic(), "\n")
