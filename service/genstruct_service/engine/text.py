"""Turning token pieces into text: whole UTF-8 characters only, stop strings never leaked."""

from __future__ import annotations

import codecs
from collections.abc import Iterable


class StopScanner:
    """Finds stop strings across chunk boundaries and holds back what could begin one.

    Invariant: text already released never contains the start of a stop string that could
    still complete, because the longest suffix that is a prefix of a stop is held back.
    So any stop occurrence begins inside the held-back text plus the new chunk.
    """

    __slots__ = ("_first_chars", "_held", "_max_hold", "_stops")

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(sorted({s for s in stops if s}, key=len))
        self._first_chars = frozenset(s[0] for s in self._stops)
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        self._held = ""

    def push(self, chunk: str) -> tuple[str, bool]:
        """Add text; return (text safe to release, whether a stop string was found).

        After a stop the scanner is done: the text from the stop on is dropped.
        """
        text = self._held + chunk if self._held else chunk
        if not text:
            return "", False
        if not self._first_chars.isdisjoint(text):
            cut = -1
            for stop in self._stops:
                at = text.find(stop)
                if at != -1 and (cut == -1 or at < cut):
                    cut = at
            if cut != -1:
                self._held = ""
                return text[:cut], True
            hold = self._hold_length(text)
        else:
            hold = 0
        if hold:
            self._held = text[-hold:]
            return text[:-hold], False
        self._held = ""
        return text, False

    def _hold_length(self, text: str) -> int:
        for k in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[-k:]
            if tail[0] in self._first_chars and any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def flush(self) -> str:
        """The held-back text, at the end of a generation that did not stop on a stop string."""
        held, self._held = self._held, ""
        return held


class TextAssembler:
    """Token pieces (bytes) in, releasable text out: UTF-8 completed, stop strings cut.

    A piece may end inside a multi-byte character (byte-fallback tokens); the incremental
    decoder keeps the incomplete bytes until the character completes.
    """

    __slots__ = ("_decoder", "_parts", "_scanner", "stopped")

    def __init__(self, stops: Iterable[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._scanner = StopScanner(stops)
        self._parts: list[str] = []
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the new text to release (maybe empty)."""
        if self.stopped:
            return ""
        decoded = self._decoder.decode(piece)
        if not decoded:
            return ""
        out, self.stopped = self._scanner.push(decoded)
        if out:
            self._parts.append(out)
        return out

    @property
    def mid_character(self) -> bool:
        """Whether bytes of an incomplete UTF-8 character are buffered."""
        return bool(self._decoder.getstate()[0])

    def finish(self) -> str:
        """Release everything held back (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        tail, self.stopped = self._scanner.push(self._decoder.decode(b"", final=True))
        if not self.stopped:
            tail += self._scanner.flush()
        if tail:
            self._parts.append(tail)
        return tail

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._parts)
