"""Progress of a run: a bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import time


def log(message: str, progress) -> None:
    if progress is not None:
        progress.log(message)


class Progress:
    """A progress bar on a terminal (one line redrawn), plain log lines elsewhere."""

    def __init__(self, stream, total: int):
        self.stream = stream
        self.total = max(total, 1)
        self.done = 0
        self.begin = time.perf_counter()
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.status = ""

    def log(self, message: str) -> None:
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        print(message, file=self.stream, flush=True)
        self.draw()

    def advance(self, status: str = "", steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)
        self.status = status
        self.draw()

    def draw(self) -> None:
        if not self.tty or self.stream is None:
            return
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.begin
        self.stream.write(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                          f"{elapsed:4.0f} s  {self.status}"[:200])
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()
