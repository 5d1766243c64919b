"""Where a pair's text comes from: the runs of words it copies from the document.

A word is a run of letters and digits, or one other character that is not whitespace, so the
text between two words is only ever whitespace, and a run of words found in the content is a
passage of it up to whitespace. A word of the answer is grounded when it lies in a run of at
least `min_run` words that the content holds too; the evidence is where those runs are in the
content. Pure functions of text: the servicer runs them on a worker thread, never on the
engine's thread or the event loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"\w+|[^\w\s]")
# Where one run of words occurs many times in a document, the longest copy is looked for
# among this many of its places only, so a repetitive document costs no more than this.
_MAX_PLACES = 16

DEFAULT_MIN_RUN = 6


@dataclass(frozen=True, slots=True)
class Grounding:
    """The spans of the content a text copies (code points [start, end), sorted, disjoint)
    and the share of the text's words in runs copied from the content."""

    evidence: tuple[tuple[int, int], ...]
    share: float


NONE = Grounding((), 0.0)


def words(text: str) -> list[str]:
    """The words of `text`, as grounding counts them."""
    return _WORD.findall(text)


class ContentIndex:
    """The words of one content and the places of every run of `min_run` of them.

    `offset` is added to every span: a part of a chunked document gives spans in the whole
    content.
    """

    def __init__(self, content: str, min_run: int, offset: int = 0) -> None:
        if min_run < 1:
            raise ValueError("min_run must be at least 1")
        self.min_run = min_run
        self._offset = offset
        self._words: list[str] = []
        self._starts: list[int] = []
        self._ends: list[int] = []
        for match in _WORD.finditer(content):
            self._words.append(match.group())
            self._starts.append(match.start())
            self._ends.append(match.end())
        self._places: dict[tuple[str, ...], list[int]] = {}
        found = self._words
        for place in range(len(found) - min_run + 1):
            self._places.setdefault(tuple(found[place : place + min_run]), []).append(place)

    def ground(self, text: str) -> Grounding:
        """What of `text` is copied from the content (NONE for a text with no such run)."""
        copy = words(text)
        n = self.min_run
        if len(copy) < n or not self._places:
            return NONE
        source = self._words
        runs: list[tuple[int, int]] = []  # word ranges of the content, one per copied run
        covered = 0  # words of `copy` in a run
        covered_to = 0  # ... counted up to this word
        i = 0
        while i <= len(copy) - n:
            places = self._places.get(tuple(copy[i : i + n]))
            if places is None:
                i += 1
                continue
            best, length = places[0], n
            for place in places[:_MAX_PLACES]:
                end = n
                while (
                    i + end < len(copy)
                    and place + end < len(source)
                    and copy[i + end] == source[place + end]
                ):
                    end += 1
                if end > length:
                    best, length = place, end
            # every window of n words after i that starts inside this run ends inside it too,
            # except those starting in its last n - 1 words: look on from the first of them
            covered += i + length - max(i, covered_to)
            covered_to = i + length
            runs.append((best, best + length))
            i = max(i + 1, i + length - n + 1)
        if not runs:
            return NONE
        return Grounding(self._spans(runs), covered / len(copy))

    def _spans(self, runs: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
        """Word ranges of the content to code point spans, sorted and disjoint.

        A range that overlaps one before it keeps only its words after that one's end: the
        rest is still a run the text copies (a passage of it), which a merge of the two
        ranges would not be.
        """
        spans: list[tuple[int, int]] = []
        reached = 0
        for first, end in sorted(runs, key=lambda run: (run[0], -run[1])):
            if end <= reached:
                continue
            first = max(first, reached)
            spans.append(
                (self._starts[first] + self._offset, self._ends[end - 1] + self._offset)
            )
            reached = end
        return tuple(spans)
