"""Draft verification without a model: fixed logits, and the contract of `verify`."""

from __future__ import annotations

import numpy as np
from genstruct_service.engine.verify import drafted_hits, verify
from hypothesis import given
from hypothesis import strategies as st

VOCAB = 8


def logits_for(tokens: list[int]) -> np.ndarray:
    """One row of logits per token, whose argmax is that token."""
    rows = np.zeros((len(tokens), VOCAB), dtype=np.float32)
    for i, token in enumerate(tokens):
        rows[i, token] = 1.0
    return rows


class Greedy:
    """Samples the argmax of fixed logits and records the rows it was asked for."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits
        self.rows: list[int] = []

    def __call__(self, row: int) -> int:
        self.rows.append(row)
        return int(np.argmax(self.logits[row]))


def always(token: int) -> bool:
    return True


def test_a_whole_draft_the_sampler_agrees_with_gives_one_token_more() -> None:
    sample = Greedy(logits_for([3, 4, 5, 6]))
    tokens = verify([3, 4, 5], sample, always)
    assert tokens == [3, 4, 5, 6]
    assert drafted_hits([3, 4, 5], tokens) == 3
    assert sample.rows == [0, 1, 2, 3]


def test_the_first_token_that_differs_ends_it() -> None:
    sample = Greedy(logits_for([3, 7, 5, 6]))
    tokens = verify([3, 4, 5], sample, always)
    assert tokens == [3, 7]
    assert drafted_hits([3, 4, 5], tokens) == 1
    assert sample.rows == [0, 1]  # the rows after the miss are never sampled


def test_a_miss_at_the_first_row_still_gives_one_token() -> None:
    tokens = verify([3, 4], Greedy(logits_for([1, 4, 5])), always)
    assert tokens == [1]
    assert drafted_hits([3, 4], tokens) == 0


def test_no_draft_samples_the_fed_tokens_row_alone() -> None:
    assert verify([], Greedy(logits_for([2])), always) == [2]


def test_a_sequence_that_stops_going_on_ends_it_on_a_drafted_token() -> None:
    # e.g. a stop string completed, or the answer marker forced in behind the token
    told: list[int] = []

    def keep(token: int) -> bool:
        told.append(token)
        return token != 4

    tokens = verify([3, 4, 5], Greedy(logits_for([3, 4, 5, 6])), keep)
    assert tokens == [3, 4] and told == [3, 4]
    assert drafted_hits([3, 4, 5], tokens) == 2  # the last was the draft's own


@given(
    st.lists(st.integers(0, VOCAB - 1), max_size=8).flatmap(
        lambda draft: st.tuples(
            st.just(draft),
            st.lists(
                st.integers(0, VOCAB - 1), min_size=len(draft) + 1, max_size=len(draft) + 1
            ),
            st.integers(0, len(draft) + 1),
        )
    )
)
def test_the_contract(case: tuple[list[int], list[int], int]) -> None:
    draft, argmax, stop_at = case
    sample = Greedy(logits_for(argmax))
    told: list[int] = []

    def keep(token: int) -> bool:
        told.append(token)
        return len(told) <= stop_at

    tokens = verify(draft, sample, keep)
    k = len(draft)
    assert 1 <= len(tokens) <= k + 1
    assert told == tokens  # every token taken is told, in order, and only those
    assert sample.rows == list(range(len(tokens)))
    assert tokens == argmax[: len(tokens)]
    assert tokens[:-1] == draft[: len(tokens) - 1]  # all but the last are the draft's
    last = len(tokens) - 1
    ended_by = (last == k, last < k and tokens[last] != draft[last], len(told) > stop_at)
    assert any(ended_by)
    hits = drafted_hits(draft, tokens)
    assert hits == sum(1 for i, t in enumerate(tokens) if i < k and t == draft[i])
