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

MIN_PART_TOKENS = 16  # a smaller part leaves too little of a document to ask about
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


class TooManyParts(ValueError):
    """The text needs more than `max_parts` parts; the split stopped there."""

    def __init__(self, max_parts: int) -> None:
        super().__init__(f"the text needs more than {max_parts} parts")
        self.max_parts = max_parts


@dataclass(frozen=True, slots=True)
class _Unit:
    start: int
    end: int
    tokens: int  # counted alone


def _largest(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """The largest k in [lo, hi] with fits(k), given fits(lo) and that fits is monotone."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _smallest(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """The smallest k in [lo, hi] with fits(k), given fits(hi) and that fits is monotone."""
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


class _Splitter:
    """Counts each span it looks at once or a few times: the split's work grows linearly."""

    def __init__(self, text: str, count: Callable[[str], int], budget: int) -> None:
        self.text = text
        self.count = count
        self.budget = budget

    def tokens(self, start: int, end: int) -> int:
        return self.count(self.text[start:end])

    def fits(self, start: int, end: int) -> bool:
        return self.tokens(start, end) <= self.budget

    def repeated(self, units: list[_Unit], i: int, after: int, overlap: int) -> int:
        """The first unit of a part whose new text starts at unit i: up to `overlap` tokens
        of the units before i are repeated, none at or before unit `after`."""
        first, tokens = i, 0
        while first - 1 > after and tokens + units[first - 1].tokens <= overlap:
            first -= 1
            tokens += units[first].tokens
        if first < i and self.tokens(units[first].start, units[i - 1].end) > overlap:
            # the counts added up to less than the repeated text counts: repeat less
            first = _smallest(first + 1, i, lambda f: f == i or self.tokens(
                units[f].start, units[i - 1].end) <= overlap)
        return first

    def packed(self, units: list[_Unit], first: int, i: int) -> tuple[int, int]:
        """(first, j): the part is units[first:j], with at least unit i, within the budget;
        `first` moves up to i when the repeated units and unit i do not fit together."""
        j, total = i + 1, sum(u.tokens for u in units[first : i + 1])
        while j < len(units) and total + units[j].tokens <= self.budget:
            total += units[j].tokens
            j += 1
        if self.fits(units[first].start, units[j - 1].end):
            return first, j
        # the units' counts added up to less than the part counts: keep fewer
        if first < i and not self.fits(units[first].start, units[i].end):
            first = i
        j = _largest(i + 1, j - 1, lambda k: self.fits(units[first].start, units[k - 1].end))
        return first, j

    def units(self, start: int, end: int, level: int) -> list[_Unit]:
        """Spans that each fit the budget, the largest units that do (level 0: paragraphs)."""
        tokens = self.tokens(start, end)
        if tokens <= self.budget:
            return [_Unit(start, end, tokens)]
        separators = (_PARAGRAPH_BREAK, _SENTENCE_END, _SPACE)
        for depth in range(level, len(separators)):
            spans = _pieces(self.text, start, end, separators[depth])
            if len(spans) > 1:
                out: list[_Unit] = []
                for s, e in spans:
                    out.extend(self.units(s, e, depth + 1))
                return out
        return self.cut(start, end)

    def cut(self, start: int, end: int) -> list[_Unit]:
        """A span with no break inside that does not fit: the longest prefixes that do.

        Each search looks at prefixes at most twice as long as the one it keeps (doubling
        from `budget` characters, then halving), so a long run without spaces costs time in
        proportion to its length, not to its square.
        """
        out = []
        while start < end:
            kept = self.longest_prefix(start, end)
            out.append(_Unit(start, start + kept, self.tokens(start, start + kept)))
            start += kept
        return out

    def longest_prefix(self, start: int, end: int) -> int:
        """The length of the longest text[start:] within text[:end] that fits; at least 1."""
        kept = 1  # one character is always kept, so a cut moves on
        length = min(self.budget, end - start)
        while self.fits(start, start + length):
            kept = length
            if length == end - start:
                return kept
            length = min(2 * length, end - start)
        # start + length does not fit: the longest prefix is shorter
        return _largest(kept, length - 1, lambda n: self.fits(start, start + n))


def split(
    text: str,
    count: Callable[[str], int],
    *,
    budget: int,
    overlap: int = 0,
    max_parts: int | None = None,
) -> list[Chunk]:
    """The parts of `text`, each at most `budget` tokens by `count`, in order.

    Every unit of the text is in some part; a part after the first may repeat up to
    `overlap` tokens of whole units from the end of the part before, never more than a
    quarter of `budget` (so each part is mostly new text). An empty or blank text gives no
    parts. Raises TooManyParts as soon as a part beyond `max_parts` would be needed.

    Each unit is counted alone once; a part is packed by adding its units' counts and then
    counted whole (a few more times only when the sum was short of the truth), so the work
    grows with the length of the text and never re-reads it from the start.
    """
    if budget < 1:
        raise ValueError("budget must be at least 1 token")
    start, end = _strip(text, 0, len(text))
    if start == end:
        return []
    overlap = min(overlap, budget // 4)
    s = _Splitter(text, count, budget)
    units = s.units(start, end, 0)
    chunks: list[Chunk] = []
    first_unit = -1  # the previous part's first unit: an overlap never reaches back to it
    i = 0
    while i < len(units):
        if max_parts is not None and len(chunks) == max_parts:
            raise TooManyParts(max_parts)
        first = s.repeated(units, i, first_unit, overlap if chunks else 0)
        first, j = s.packed(units, first, i)
        chunks.append(Chunk(len(chunks), units[first].start, units[j - 1].end))
        first_unit = first
        i = j
    return chunks
