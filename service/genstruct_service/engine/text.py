"""Turning token pieces into text: whole UTF-8 characters only, stop strings never leaked."""

from __future__ import annotations

import codecs
from collections.abc import Iterable

_utf8_decode = codecs.utf_8_decode  # (text, bytes used); final=False keeps a cut character


class StopScanner:
    """Finds stop strings across chunk boundaries and holds back what could begin one.

    Invariant: text already released never contains the start of a stop string that could
    still complete, because the longest suffix that is a prefix of a stop is held back.
    So any stop occurrence begins inside the held-back text plus the new chunk.
    """

    __slots__ = ("_max_hold", "_stops", "first_chars", "held")

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(sorted({s for s in stops if s}, key=len))
        self.first_chars = frozenset(s[0] for s in self._stops)  # no stop starts elsewhere
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        self.held = ""  # the end of the text so far that could begin a stop

    def push(self, chunk: str) -> tuple[str, bool]:
        """Add text; return (text safe to release, whether a stop string was found).

        After a stop the scanner is done: the text from the stop on is dropped.
        """
        text = self.held + chunk if self.held else chunk
        if not text:
            return "", False
        if not self.first_chars.isdisjoint(text):
            cut = -1
            for stop in self._stops:
                at = text.find(stop)
                if at != -1 and (cut == -1 or at < cut):
                    cut = at
            if cut != -1:
                self.held = ""
                return text[:cut], True
            hold = self._hold_length(text)
        else:
            hold = 0
        if hold:
            self.held = text[-hold:]
            return text[:-hold], False
        self.held = ""
        return text, False

    def _hold_length(self, text: str) -> int:
        for k in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[-k:]
            if tail[0] in self.first_chars and any(s.startswith(tail) for s in self._stops):
                return k
        return 0

    def flush(self) -> str:
        """The held-back text, at the end of a generation that did not stop on a stop string."""
        held, self.held = self.held, ""
        return held


class TextAssembler:
    """Token pieces (bytes) in, releasable text out: UTF-8 completed, stop strings cut.

    A piece may end inside a multi-byte character (byte-fallback tokens); its incomplete
    bytes are kept until the character completes. This is what codecs' incremental UTF-8
    decoder does, less its Python method on every token.
    """

    __slots__ = ("_parts", "_scanner", "_tail", "stopped")

    def __init__(self, stops: Iterable[str]) -> None:
        self._tail = b""  # the bytes of an incomplete character
        self._scanner = StopScanner(stops)
        self._parts: list[str] = []
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the new text to release (maybe empty)."""
        if self.stopped:
            return ""
        if self._tail:
            piece = self._tail + piece
        decoded, used = _utf8_decode(piece, "replace", False)
        self._tail = piece[used:] if used < len(piece) else b""
        if not decoded:
            return ""
        scanner = self._scanner
        if not scanner.held and scanner.first_chars.isdisjoint(decoded):
            out = decoded  # nothing held and no stop can start here: StopScanner.push's answer
        else:
            out, self.stopped = scanner.push(decoded)
        if out:
            self._parts.append(out)
        return out

    @property
    def mid_character(self) -> bool:
        """Whether bytes of an incomplete UTF-8 character are buffered."""
        return bool(self._tail)

    def finish(self) -> str:
        """Release everything held back (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        decoded = _utf8_decode(self._tail, "replace", True)[0]
        self._tail = b""
        tail, self.stopped = self._scanner.push(decoded)
        if not self.stopped:
            tail += self._scanner.flush()
        if tail:
            self._parts.append(tail)
        return tail

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._parts)
