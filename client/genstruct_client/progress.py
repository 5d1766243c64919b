"""Progress of a bulk run: a tqdm bar on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import NoReturn, TextIO

from tqdm import tqdm


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Counts documents, generated tokens, pairs that parsed, and failures."""

    def __init__(
        self,
        total: int | None,
        *,
        stream: TextIO | None = None,
        bar: bool | None = None,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.clock = clock
        self.started = clock()
        self.interval = interval
        self.done = 0  # documents finished this run (succeeded or failed)
        self.skipped = 0  # already written by an earlier run, or duplicates
        self.failed = 0
        self.tokens = 0
        self.pairs = 0
        self.parsed = 0
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar: tqdm[NoReturn] | None = (
            tqdm(total=total, unit="doc", file=self.stream, dynamic_ncols=True, smoothing=0.1)
            if use_bar
            else None
        )
        self._last_line = self.started
        self._last_postfix = 0.0

    def skip(self, count: int = 1) -> None:
        self.skipped += count
        if self._bar is not None:
            self._bar.update(count)

    def update(
        self, *, tokens: int = 0, pairs: int = 0, parsed: int = 0, failed: bool = False
    ) -> None:
        """One document finished."""
        self.done += 1
        self.failed += int(failed)
        self.tokens += tokens
        self.pairs += pairs
        self.parsed += parsed
        now = self.clock()
        if self._bar is not None:
            self._bar.update(1)
            if now - self._last_postfix >= 0.5:
                self._bar.set_postfix_str(self.postfix(), refresh=False)
                self._last_postfix = now
        elif now - self._last_line >= self.interval:
            self._last_line = now
            print(self.line(), file=self.stream, flush=True)

    def tokens_per_second(self) -> float:
        elapsed = self.clock() - self.started
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def parse_rate(self) -> float:
        return self.parsed / self.pairs if self.pairs else 0.0

    def postfix(self) -> str:
        text = f"{self.tokens_per_second():.0f} tok/s, parsed {self.parse_rate():.0%}"
        return text + (f", {self.failed} failed" if self.failed else "")

    def line(self) -> str:
        """One plain status line."""
        elapsed = self.clock() - self.started
        position = self.done + self.skipped
        if self.total:
            head = f"{position}/{self.total} documents ({position / self.total:.0%})"
            rate = self.done / elapsed if elapsed > 0 else 0.0
            remaining = self.total - position
            eta = f", ETA {_duration(remaining / rate)}" if rate > 0 and remaining > 0 else ""
        else:
            head, eta = f"{position} documents", ""
        return f"genstruct: {head}, {self.postfix()}{eta}, elapsed {_duration(elapsed)}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix(), refresh=True)
            self._bar.close()
