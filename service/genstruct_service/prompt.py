"""The Genstruct prompt (a Jinja2 template) and the parser of its completions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import jinja2

from genstruct_service.engine.types import PromptFormat
from genstruct_service.grammar import ANSWER_RESERVE, ASSISTANT_MARK, GENSTRUCT_GBNF

__all__ = ["ASSISTANT_MARK", "GENSTRUCT_FORMAT", "USER_MARK", "ParsedCompletion",
           "end_of_answer", "parse_completion", "render_prompt"]

USER_MARK = "[[[User]]]"

# distilabel's rule: some text, the assistant marker, more text (the first marker wins).
_PAIR = re.compile(r"(.+?)\[\[\[Assistant\]\]\](.+)$", re.DOTALL)


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("genstruct_service", "templates"),
        autoescape=False,  # a completion prompt, not HTML
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("genstruct.jinja")


def render_prompt(title: str, content: str) -> str:
    """The raw completion prompt for one document; it ends with `[[[User]]] `."""
    return _template().render(title=title, content=content)


# What the engine is given: the template, the next user turn, which ends an answer, and the
# grammar and marker of constrained output.
GENSTRUCT_FORMAT = PromptFormat(
    render=render_prompt, stop=USER_MARK, grammar=GENSTRUCT_GBNF, answer_marker=ASSISTANT_MARK,
    answer_reserve=ANSWER_RESERVE,
)


@dataclass(frozen=True, slots=True)
class ParsedCompletion:
    """A completion split into the user's question and the assistant's answer."""

    raw_text: str
    user: str | None
    assistant: str | None

    @property
    def parsed(self) -> bool:
        return self.assistant is not None


def end_of_answer(text: str) -> int:
    """Index where the answer ends: at a `[[[User]]]` turn after the first assistant marker."""
    marker = text.find(ASSISTANT_MARK, 1)
    if marker == -1:
        return len(text)
    next_turn = text.find(USER_MARK, marker + len(ASSISTANT_MARK))
    return len(text) if next_turn == -1 else next_turn


def parse_completion(text: str) -> ParsedCompletion:
    """Split a completion as distilabel's Genstruct task does, but end the answer at a new turn.

    A completion without `[[[Assistant]]]` (or with nothing on one side of it) is not parsed:
    `user` and `assistant` are None and the text is kept in `raw_text`.
    """
    match = _PAIR.search(text[: end_of_answer(text)])
    if match is None:
        return ParsedCompletion(raw_text=text, user=None, assistant=None)
    return ParsedCompletion(
        raw_text=text, user=match.group(1).strip(), assistant=match.group(2).strip()
    )
