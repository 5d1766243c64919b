"""Splitting long content into parts that fit a token budget: properties over any text."""

from __future__ import annotations

import itertools
import re

import pytest
from genstruct_service.chunking import Chunk, TooManyParts, split
from hypothesis import given, settings
from hypothesis import strategies as st

_TOKEN = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")


def count(text: str) -> int:
    """A stand-in tokenizer: a run of letters or digits, or any other visible character."""
    return len(_TOKEN.findall(text))


words = st.sampled_from(
    ["tide", "moon", "orbit", "the", "of", "gravity", "42", "潮汐", "月", "🌊", "ü", "—", "x" * 30]
)
sentence = st.lists(words, min_size=1, max_size=12).map(lambda ws: " ".join(ws) + ".")
paragraph = st.lists(sentence, min_size=1, max_size=6).map(" ".join)
documents = st.lists(paragraph, min_size=1, max_size=8).map("\n\n".join)


def paragraphs(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"[^\n]+(?:\n(?![ \t]*\n)[^\n]+)*", text)]


@settings(max_examples=300, deadline=None)
@given(documents, st.integers(4, 60), st.integers(0, 20))
def test_parts_fit_cover_in_order_and_overlap_within_bounds(
    text: str, budget: int, overlap: int
) -> None:
    chunks = split(text, count, budget=budget, overlap=overlap)
    assert chunks and [c.index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert 0 <= c.start < c.end <= len(text)
        assert count(text[c.start : c.end]) <= budget
        assert not text[c.start].isspace() and not text[c.end - 1].isspace()
    for a, b in itertools.pairwise(chunks):
        assert a.start < b.start and a.end < b.end  # in order, each adds text
        if b.start < a.end:
            assert count(text[b.start : a.end]) <= overlap
    if overlap == 0:
        assert all(b.start >= a.end for a, b in itertools.pairwise(chunks))
    covered = [False] * len(text)
    for c in chunks:
        covered[c.start : c.end] = [True] * (c.end - c.start)
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())
    for start, end in paragraphs(text):  # a paragraph that fits is never cut
        if count(text[start:end]) <= budget:
            assert any(c.start <= start and end <= c.end for c in chunks), text[start:end]


def test_short_content_is_one_part_and_blank_content_none() -> None:
    assert split("  The tide rises.\n", count, budget=10) == [Chunk(0, 2, 17)]
    assert split(" \n\n ", count, budget=10) == []
    with pytest.raises(ValueError):
        split("text", count, budget=0)


def test_sentences_split_a_paragraph_too_long_for_one_part() -> None:
    text = "The moon pulls the sea. The sun pulls it too. Together they make spring tides."
    chunks = split(text, count, budget=8)
    parts = [text[c.start : c.end] for c in chunks]
    assert parts == ["The moon pulls the sea.", "The sun pulls it too.",
                     "Together they make spring tides."]


def test_the_overlap_repeats_the_last_whole_sentence() -> None:
    text = "A b. C d. E f. G h. I j. K l."  # three tokens a sentence
    parts = [text[c.start : c.end] for c in split(text, count, budget=12, overlap=3)]
    assert parts == ["A b. C d. E f. G h.", "G h. I j. K l."]


def test_the_overlap_is_at_most_a_quarter_of_the_part() -> None:
    text = " ".join(f"Word{i} w." for i in range(200))  # three tokens a sentence
    chunks = split(text, count, budget=24, overlap=10**9)
    for a, b in itertools.pairwise(chunks):
        assert count(text[b.start : a.end]) <= 24 // 4
    assert len(chunks) <= 600 // (24 - 6) + 1  # every part brings 18 tokens or more of new text


class Counting:
    """The stand-in tokenizer, adding up how many characters it was given: the split's work."""

    def __init__(self) -> None:
        self.characters = 0

    def __call__(self, text: str) -> int:
        self.characters += len(text)
        return count(text)


@pytest.mark.parametrize(
    "text, budget, overlap",
    [
        ("潮汐" * 10_000, 16, 0),  # no spaces: every part is a cut
        (" ".join(f"Sentence {i} goes on a while." for i in range(2_000)), 16, 10**9),
        ("\n\n".join(["word " * 40] * 200), 1024, 256),  # paragraphs that all fit
    ],
    ids=["no spaces", "huge overlap", "paragraphs"],
)
def test_the_work_grows_with_the_length_of_the_text_not_its_square(
    text: str, budget: int, overlap: int
) -> None:
    counting = Counting()
    chunks = split(text, counting, budget=budget, overlap=overlap)
    assert chunks[-1].end == len(text.rstrip())
    assert counting.characters <= 40 * len(text)


def test_the_split_stops_at_max_parts() -> None:
    text = " ".join(f"Sentence {i} goes on a while." for i in range(2_000))
    counting = Counting()
    with pytest.raises(TooManyParts) as error:
        split(text, counting, budget=16, max_parts=3)
    assert error.value.max_parts == 3
    assert counting.characters <= 10 * len(text)  # the units, and three parts only


def test_text_without_breaks_is_cut_between_characters() -> None:
    text = "潮汐" * 40  # no spaces, no sentence ends: only characters to cut at
    chunks = split(text, count, budget=7)
    assert "".join(text[c.start : c.end] for c in chunks) == text
    assert all(count(text[c.start : c.end]) <= 7 for c in chunks)
    emoji = "🌊" * 25
    assert sum(c.end - c.start for c in split(emoji, count, budget=10)) == 25
