"""A one-line live progress bar on stderr (redrawn in place on a terminal, plain lines
otherwise)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(self, total_turns: int | None, duration_s: float | None,
                 stream: TextIO | None = None) -> None:
        self.total = total_turns
        self.duration = duration_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
        self.failed = 0
        self.level = 0
        self.last_v2v: float | None = None
        self.t0 = time.perf_counter()
        self.level_t0 = self.t0

    def start_level(self, sessions: int) -> None:
        self.level = sessions
        self.level_t0 = time.perf_counter()
        if not self.tty:
            print(f"voicepipe-bench: {sessions} session(s)", file=self.stream, flush=True)

    def turn(self, rec: dict[str, Any]) -> None:
        self.done += 1
        self.failed += bool(rec.get("error"))
        v2v = rec.get("client_voice_to_voice_ms")
        self.last_v2v = v2v if v2v is not None else self.last_v2v
        self._draw(rec)

    def _draw(self, rec: dict[str, Any]) -> None:
        width = 24
        if self.total:
            frac = min(1.0, self.done / self.total)
            count = f"{self.done}/{self.total} turns"
        elif self.duration:
            frac = min(1.0, (time.perf_counter() - self.level_t0) / self.duration)
            count = f"{self.done} turns"
        else:
            frac, count = 0.0, f"{self.done} turns"
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        v2v = "-" if self.last_v2v is None else f"{self.last_v2v:.0f} ms"
        line = (f"[{bar}] {count}  sessions {self.level}  last v2v {v2v}  "
                f"errors {self.failed}  {time.perf_counter() - self.t0:.0f}s")
        if self.tty:
            print("\r" + line, end="", file=self.stream, flush=True)
        else:
            err = f"  error: {rec['error']}" if rec.get("error") else ""
            print(line + err, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)
