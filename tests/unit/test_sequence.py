"""A sequence's state without a model: append, force, finish, and the forced answer marker."""

from __future__ import annotations

from genstruct_service.engine.sequence import AnswerMarker, Sequence
from genstruct_service.engine.types import FinishReason
from hypothesis import given
from hypothesis import strategies as st

EOS = 0
# one token per piece; 9 and 10 are the halves of a two-byte character (é)
PIECES = {1: b"What", 2: b" is", 3: b" it", 4: b"?", 5: b" [", 6: b"[[", 7: b"A]]]", 8: b" Yes",
          9: b"\xc3", 10: b"\xa9", 11: b" STOP", 12: b"[", 13: b"]", 14: b"A"}  # fmt: skip
BY_TEXT = {v.decode("utf-8", "replace"): k for k, v in PIECES.items()}


class Vocab:
    eog = frozenset({EOS})

    def piece(self, token: int) -> bytes:
        return PIECES[token]

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """The rest of the marker `[[[A]]]`, as the tokens above spell it."""
        out = []
        while text:
            for piece, token in sorted(BY_TEXT.items(), key=lambda item: -len(item[0])):
                if piece and text.startswith(piece):
                    out.append(token)
                    text = text[len(piece) :]
                    break
            else:
                raise AssertionError(f"cannot tokenize {text!r}")
        return out


class Sampler:
    def __init__(self) -> None:
        self.forced: list[int] = []
        self.closed = False

    def sample(self, row: int) -> int:
        raise AssertionError("a sequence never samples by itself")

    def take_forced(self, token: int) -> None:
        self.forced.append(token)

    def close(self) -> None:
        self.closed = True


def sequence(max_tokens: int = 10, stops: tuple[str, ...] = (), *, marker: bool = False,
             stream: bool = True) -> Sequence:  # fmt: skip
    answer = AnswerMarker("[[[A]]]", reserve=2, marker_tokens=2) if marker else None
    return Sequence(0, Sampler(), Vocab(), stops=stops, max_tokens=max_tokens, stream=stream,
                    marker=answer)  # fmt: skip


def test_a_sampled_token_is_counted_written_and_fed_next() -> None:
    seq = sequence()
    assert seq.append(1) and seq.append(2)
    assert seq.pending == [1, 2] and seq.n_generated == 2 and seq.generating
    assert seq.take_text() == "What is" and seq.take_text() == ""
    seq.advance(2)
    assert seq.pos == 2 and seq.pending == []


def test_the_end_of_generation_ends_it_uncounted() -> None:
    seq = sequence()
    seq.append(1)
    assert not seq.append(EOS)
    assert seq.finish_reason is FinishReason.EOS and seq.n_generated == 1
    assert seq.pending == [] and seq.text.text == "What"


def test_max_tokens_ends_it_and_releases_what_was_held_back() -> None:
    seq = sequence(max_tokens=2, stops=("? Yes",))
    assert seq.append(1)
    assert not seq.append(4)  # "?" is held back: it may begin the stop string
    assert seq.finish_reason is FinishReason.LENGTH
    assert seq.text.text == "What?" and seq.take_text() == "What?"


def test_a_stop_string_across_tokens_ends_it_without_the_stop() -> None:
    seq = sequence(stops=(" STOP",))
    seq.append(1)
    assert not seq.append(11)
    assert seq.finish_reason is FinishReason.STOP and seq.text.text == "What"


def test_cancelling_releases_nothing_held_back() -> None:
    seq = sequence(stops=("? Yes",))
    seq.append(1)
    seq.append(4)
    seq.finish(FinishReason.CANCELLED)
    assert seq.text.text == "What" and seq.pending == []


def test_a_caller_that_does_not_stream_gets_no_text_per_step() -> None:
    seq = sequence(stream=False)
    seq.append(1)
    assert seq.take_text() == "" and seq.text.text == "What"


def test_forced_tokens_are_written_counted_fed_and_given_to_the_sampler() -> None:
    seq = sequence()
    seq.append(1)
    seq.force([6, 7])
    assert seq.pending == [1, 6, 7] and seq.n_generated == 3
    assert isinstance(seq.sampler, Sampler) and seq.sampler.forced == [6, 7]
    assert seq.text.text == "What[[A]]]"


def test_the_marker_is_forced_when_the_budget_runs_low() -> None:
    # window: 2 * 2 marker tokens + 2 reserve = 6 tokens left; the rest of the marker
    # ("[[" "[" "A]]]": 6, 12, 7) must leave at most the reserve
    seq = sequence(max_tokens=8, marker=True)
    assert seq.append(1)  # 7 left: outside the window
    assert seq.append(2)  # 6 left, but 6 - 3 > 2
    assert not seq.append(3)  # 5 left: 5 - 3 <= 2, forced
    assert seq.pending == [1, 2, 3, 6, 12, 7] and seq.n_generated == 6  # none decoded yet
    assert isinstance(seq.sampler, Sampler) and seq.sampler.forced == [6, 12, 7]
    assert seq.text.text == "What is it[[[A]]]" and seq.generating
    assert seq.append(8)  # the marker is written: nothing more is forced
    assert seq.pending[-1] == 8


def test_the_marker_begun_by_the_model_is_completed() -> None:
    marker = AnswerMarker("[[[A]]]", reserve=2, marker_tokens=2)

    def tokenize(text: str) -> list[int]:
        return Vocab().tokenize(text, add_special=False)

    assert marker.after(b"What", 10, False, tokenize) == []
    assert marker.after(b" [", 4, False, tokenize) == [6, 7]  # "[[", "A]]]"
    assert marker.after(b" Yes", 3, False, tokenize) == []  # written now


def test_no_marker_before_a_visible_question() -> None:
    marker = AnswerMarker("[[[A]]]", reserve=2, marker_tokens=2)
    assert marker.after(b" [", 3, False, lambda text: [12] * len(text)) == []
    assert not marker.question_visible


def test_no_marker_inside_a_character_then_the_marker_at_the_last_tokens() -> None:
    seq = sequence(max_tokens=5, marker=True)
    assert seq.append(9)  # half of é: 4 left, but never inside a character
    assert not seq.append(10)  # é: 3 left, the marker's 3 tokens take them all
    assert seq.finish_reason is FinishReason.LENGTH
    assert seq.text.text == "é[[[A]]]"  # a LENGTH finish that still parses


@given(st.lists(st.sampled_from(sorted(PIECES)), max_size=30), st.integers(1, 16))
def test_the_state_stays_consistent(tokens: list[int], max_tokens: int) -> None:
    seq = sequence(max_tokens=max_tokens, stops=(" STOP",), marker=True)
    for token in tokens:
        if not seq.generating:
            break
        seq.append(token)
        # a marker forced at the last tokens may run past max_tokens by its own length
        assert seq.n_generated <= max_tokens + 3
        if seq.generating:
            assert seq.pending  # a generating sequence always has a token to feed
            assert seq.n_generated < max_tokens
        else:
            assert seq.pending == []
    assert seq.take_text() == seq.text.text  # streamed, every piece of it
