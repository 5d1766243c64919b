"""The Genstruct prompt matches distilabel's, and the parser agrees with distilabel's rule."""

from __future__ import annotations

import re

from genstruct_service.prompt import ASSISTANT_MARK, USER_MARK, parse_completion, render_prompt
from hypothesis import example, given
from hypothesis import strategies as st

# distilabel's own unit-test vector for Genstruct.format_input.
DISTILABEL_PROMPT = (
    "[[[Title]]] This is the title.\n[[[Content]]] This is the content.\n\n"
    "The following is an interaction between a user and an AI assistant that is related to "
    "the above text.\n\n[[[User]]] "
)

# distilabel's parser, restated from its documented behaviour.
DISTILABEL_RULE = re.compile(r"(.+?)\[\[\[Assistant\]\]\](.+)$", re.DOTALL)


def distilabel_parse(text: str) -> tuple[str | None, str | None]:
    match = DISTILABEL_RULE.search(text)
    if match is None:
        return None, None
    return match.group(1).strip(), match.group(2).strip()


def test_prompt_is_distilabels() -> None:
    assert render_prompt("This is the title.\n", "This is the content.\n") == DISTILABEL_PROMPT


def test_prompt_trims_and_keeps_inner_text() -> None:
    prompt = render_prompt("  Über Käse \t", "\n\nLine one.\n\nLine two — 日本語 🧀\n ")
    assert prompt.startswith(
        "[[[Title]]] Über Käse\n[[[Content]]] Line one.\n\nLine two — 日本語 🧀\n"
    )
    assert prompt.endswith("\n\n[[[User]]] ")


def test_prompt_does_not_interpret_markup() -> None:
    prompt = render_prompt("<b>{{ x }}</b>", "a & b {% raw %}")
    assert "[[[Title]]] <b>{{ x }}</b>\n[[[Content]]] a & b {% raw %}\n" in prompt


def test_distilabel_output_vector() -> None:
    result = parse_completion("This is the instruction.\n[[[Assistant]]] This is the response.\n")
    assert (result.user, result.assistant, result.parsed) == (
        "This is the instruction.",
        "This is the response.",
        True,
    )


def test_no_assistant_marker_is_not_parsed_and_keeps_text() -> None:
    result = parse_completion("Just a question with no answer")
    assert result.parsed is False
    assert result.user is None and result.assistant is None
    assert result.raw_text == "Just a question with no answer"


def test_later_user_turn_ends_the_answer() -> None:
    text = "What is X?\n[[[Assistant]]] X is Y.\n[[[User]]] And Z?\n[[[Assistant]]] Z."
    result = parse_completion(text)
    assert (result.user, result.assistant) == ("What is X?", "X is Y.")
    assert result.raw_text == text


def test_answer_cut_to_nothing_is_not_parsed() -> None:
    assert parse_completion("Q?[[[Assistant]]][[[User]]] more").parsed is False


@given(st.text())
@example("")
@example("[[[Assistant]]]")
@example("a[[[Assistant]]]b[[[Assistant]]]c")
@example(" [[[Assistant]]] \n")
def test_parser_never_raises_and_keeps_the_text(text: str) -> None:
    result = parse_completion(text)
    assert result.raw_text == text
    assert result.parsed == (result.assistant is not None) == (result.user is not None)
    if result.parsed:
        assert ASSISTANT_MARK in text
        assert result.user == result.user.strip()  # type: ignore[union-attr]


_pieces = st.lists(
    st.one_of(st.text(), st.sampled_from([ASSISTANT_MARK, "[[[", "]]]", "\n", " "])), max_size=8
)


@given(_pieces)
def test_parser_agrees_with_distilabel_without_a_later_turn(pieces: list[str]) -> None:
    text = "".join(pieces)
    after = text.find(ASSISTANT_MARK, 1)
    if after != -1 and USER_MARK in text[after + len(ASSISTANT_MARK) :]:
        return  # a later turn: the case where we deliberately differ
    result = parse_completion(text)
    assert (result.user, result.assistant) == distilabel_parse(text)


_no_marks = st.text(st.characters(exclude_characters="["))


@given(_no_marks, _no_marks, st.text())
def test_later_turn_never_reaches_the_answer(question: str, answer: str, rest: str) -> None:
    text = f"Q{question}{ASSISTANT_MARK}A{answer}{USER_MARK}{rest}"
    result = parse_completion(text)
    assert result.parsed
    assert result.assistant == f"A{answer}".strip()
