"""Evidence spans and grounding shares: properties over generated documents and answers."""

from __future__ import annotations

import itertools
import re

from genstruct_service.grounding import NONE, ContentIndex, words
from hypothesis import given, settings
from hypothesis import strategies as st

# Few distinct words, so that generated answers copy runs of the document often.
WORD = st.sampled_from(["the", "tide", "moon", "sea", "rises", "falls", "42", "é", ",", "."])
SPACE = st.sampled_from([" ", "  ", "\n", "\t", " \n "])


@st.composite
def texts(draw: st.DrawFn, min_words: int = 0, max_words: int = 60) -> str:
    parts = draw(st.lists(WORD, min_size=min_words, max_size=max_words))
    return "".join(word + draw(SPACE) for word in parts)


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


@st.composite
def documents_and_answers(draw: st.DrawFn) -> tuple[str, str, int]:
    content = draw(texts(min_words=1))
    n = draw(st.integers(1, 8))
    # an answer made of passages of the content and words of its own
    pieces = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            found = list(re.finditer(r"\w+|[^\w\s]", content))
            first = draw(st.integers(0, len(found) - 1))
            last = draw(st.integers(first, len(found) - 1))
            pieces.append(content[found[first].start() : found[last].end()])
        else:
            pieces.append(draw(texts(max_words=8)))
    return content, " ".join(pieces), n


@settings(max_examples=400, deadline=None)
@given(documents_and_answers(), st.integers(0, 50))
def test_every_span_is_in_the_answer_up_to_whitespace(
    case: tuple[str, str, int], offset: int
) -> None:
    content, answer, n = case
    grounding = ContentIndex(content, n).ground(answer)
    for start, end in grounding.evidence:
        assert 0 <= start < end <= len(content)
        assert squeeze(content[start:end]) in squeeze(answer)
    # a part of a longer content: the same spans, moved by where the part starts
    shifted = ContentIndex(content, n, offset=offset).ground(answer)
    assert shifted.evidence == tuple((s + offset, e + offset) for s, e in grounding.evidence)
    assert shifted.share == grounding.share


@settings(max_examples=400, deadline=None)
@given(documents_and_answers())
def test_spans_are_sorted_and_do_not_overlap(case: tuple[str, str, int]) -> None:
    content, answer, n = case
    spans = ContentIndex(content, n).ground(answer).evidence
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


@settings(max_examples=300, deadline=None)
@given(texts(min_words=1), st.integers(1, 8), st.data())
def test_a_passage_of_the_document_is_wholly_grounded(
    content: str, n: int, data: st.DataObject
) -> None:
    found = list(re.finditer(r"\w+|[^\w\s]", content))
    first = data.draw(st.integers(0, len(found) - 1))
    last = data.draw(st.integers(first, len(found) - 1))
    passage = content[found[first].start() : found[last].end()]
    grounding = ContentIndex(content, n).ground(passage)
    if last - first + 1 >= n:
        assert grounding.share == 1.0
        assert grounding.evidence  # and it says where
    else:  # shorter than a run: nothing counts
        assert grounding == NONE


@settings(max_examples=300, deadline=None)
@given(texts(min_words=1), texts(), st.integers(1, 8))
def test_an_answer_sharing_no_run_of_n_words_is_not_grounded(
    content: str, answer: str, n: int
) -> None:
    content_runs = {tuple(w) for w in _windows(words(content), n)}
    if any(tuple(w) in content_runs for w in _windows(words(answer), n)):
        return  # this answer does share a run
    assert ContentIndex(content, n).ground(answer) == NONE


def _windows(items: list[str], n: int) -> list[list[str]]:
    return [items[i : i + n] for i in range(len(items) - n + 1)]


@settings(max_examples=300, deadline=None)
@given(documents_and_answers())
def test_the_share_is_the_words_in_copied_runs(case: tuple[str, str, int]) -> None:
    # the definition, computed the slow way: a word counts when some window of n words
    # around it is in the content
    content, answer, n = case
    content_runs = {tuple(w) for w in _windows(words(content), n)}
    copy = words(answer)
    counted = [False] * len(copy)
    for i, window in enumerate(_windows(copy, n)):
        if tuple(window) in content_runs:
            counted[i : i + n] = [True] * n
    expected = sum(counted) / len(copy) if copy else 0.0
    assert ContentIndex(content, n).ground(answer).share == expected


def test_a_known_answer() -> None:
    content = "Tides are the rise and fall of sea levels caused by the Moon and the Sun."
    answer = "Tides are the rise and fall of sea levels caused by the Moon and cheese."
    grounding = ContentIndex(content, 6).ground(answer)
    # 14 of the answer's 16 words (cheese and the full stop are its own)
    assert grounding.share == 14 / 16
    assert [content[s:e] for s, e in grounding.evidence] == [
        "Tides are the rise and fall of sea levels caused by the Moon and"
    ]


def test_a_passage_copied_twice_is_one_span() -> None:
    content = "one two three four five six seven eight"
    grounding = ContentIndex(content, 3).ground("two three four, and again two three four")
    assert [content[s:e] for s, e in grounding.evidence] == ["two three four"]
    assert grounding.share == 6 / 9


def test_a_run_that_starts_inside_another_counts_too() -> None:
    # "a b c d" is copied from the start of the content and "d e" from its end: every word
    # of the answer lies in a copied run of two, though no run starts after "d"
    content = "a b c d x d e"
    grounding = ContentIndex(content, 2).ground("a b c d e")
    assert grounding.share == 1.0
    assert [content[s:e] for s, e in grounding.evidence] == ["a b c d", "d e"]
