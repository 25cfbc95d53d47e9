"""Progress of long work (loading, perplexity) as one line on a stream: rewritten in place on a
terminal; elsewhere a plain line at most every `every_s` seconds, and the last one."""
from __future__ import annotations

import time


class Progress:
    """`show(text)` as work goes on, `close(text)` at the end (None: clear the line)."""

    def __init__(self, stream, *, label: str, every_s: float = 5.0):
        self.stream, self.label, self.every_s = stream, label, every_s
        self.tty = stream.isatty()
        self.last = time.monotonic()

    def show(self, text: str, *, last: bool = False) -> None:
        line = f"{self.label}: {text}"
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
        elif last or time.monotonic() - self.last >= self.every_s:
            self.stream.write(line + "\n")
            self.last = time.monotonic()
        self.stream.flush()

    def close(self, text: str | None = None) -> None:
        if text is not None:
            self.show(text, last=True)
        if self.tty:
            self.stream.write("\n" if text is not None else "\r\x1b[K")
            self.stream.flush()
