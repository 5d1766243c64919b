# ruff: noqa: RUF001  (the CJK sentence ends are the point)
"""Long documents in parts that each fit a token budget: paragraphs, then sentences, then words.

A part is a span of the content (code point offsets, so a part is never cut inside a
character), measured with the model's own tokenizer. A unit that fits the budget is never
cut: a paragraph that fits stays whole, else its sentences, else its words, and only a word
longer than the budget (a long URL, a run of text without spaces) is cut at the longest
prefix that fits. Units are packed into parts in order, as many as fit, and each part after
the first starts with the last sentences of the one before, up to `overlap` tokens of them,
so a question about a cut paragraph keeps its context.

Pure given `count` (text -> tokens): the servicer passes the engine's tokenizer, the tests a
stand-in.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# a sentence ends at . ! ? (and their CJK forms) followed by space, or at a CJK full stop
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One part of the content: content[start:end]."""

    index: int
    start: int
    end: int


def _pieces(text: str, start: int, end: int, separator: re.Pattern[str]) -> list[tuple[int, int]]:
    """The spans between matches of `separator` inside text[start:end], without them."""
    spans = []
    at = start
    for match in separator.finditer(text, start, end):
        if match.start() > at:
            spans.append((at, match.start()))
        at = max(at, match.end())
    if at < end:
        spans.append((at, end))
    return spans


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


class _Splitter:
    def __init__(self, text: str, count: Callable[[str], int], budget: int) -> None:
        self.text = text
        self.count = count
        self.budget = budget

    def tokens(self, start: int, end: int) -> int:
        return self.count(self.text[start:end])

    def units(self, start: int, end: int, level: int) -> list[tuple[int, int]]:
        """Spans that each fit the budget, the largest units that do (level 0: paragraphs)."""
        if self.tokens(start, end) <= self.budget:
            return [(start, end)]
        separators = (_PARAGRAPH_BREAK, _SENTENCE_END, _SPACE)
        for depth in range(level, len(separators)):
            spans = _pieces(self.text, start, end, separators[depth])
            if len(spans) > 1:
                out: list[tuple[int, int]] = []
                for s, e in spans:
                    out.extend(self.units(s, e, depth + 1))
                return out
        return self.cut(start, end)

    def cut(self, start: int, end: int) -> list[tuple[int, int]]:
        """A span with no break inside that does not fit: the longest prefixes that do."""
        out = []
        while start < end:
            lo, hi = start + 1, end  # text[start:lo] always kept, so the loop moves on
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.tokens(start, mid) <= self.budget:
                    lo = mid
                else:
                    hi = mid - 1
            out.append((start, lo))
            start = lo
        return out


def split(
    text: str, count: Callable[[str], int], *, budget: int, overlap: int = 0
) -> list[Chunk]:
    """The parts of `text`, each at most `budget` tokens by `count`, in order.

    Every unit of the text is in some part; a part after the first may repeat up to
    `overlap` tokens of whole units from the end of the part before. An empty or blank
    text gives no parts.
    """
    if budget < 1:
        raise ValueError("budget must be at least 1 token")
    start, end = _strip(text, 0, len(text))
    if start == end:
        return []
    s = _Splitter(text, count, budget)
    units = s.units(start, end, 0)
    chunks: list[Chunk] = []
    first_unit = -1  # the previous part's first unit: an overlap never reaches back to it
    i = 0
    while i < len(units):
        first = i
        while (
            overlap > 0
            and first - 1 > first_unit
            and chunks
            and s.tokens(units[first - 1][0], units[i - 1][1]) <= overlap
        ):
            first -= 1
        j = i + 1  # at least one new unit per part
        while j < len(units) and s.tokens(units[first][0], units[j][1]) <= budget:
            j += 1
        if s.tokens(units[first][0], units[j - 1][1]) > budget:
            first = i  # the overlap and the next unit do not fit together: no overlap
        chunks.append(Chunk(len(chunks), units[first][0], units[j - 1][1]))
        first_unit = first
        i = j
    return chunks
