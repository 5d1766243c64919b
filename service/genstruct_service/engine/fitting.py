"""A document's prompt in token ids, fitted into the context: kept, refused or truncated.

Pure given a tokenizer: the engine calls it off its own thread, before a request joins the
queue, and tests call it with a stand-in tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from genstruct_service.engine.types import GenerationRequest, PromptFormat, Truncation
from genstruct_service.errors import ContextOverflow


class Tokenizer(Protocol):
    def tokenize(self, text: str, *, add_special: bool) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...


@dataclass(frozen=True, slots=True)
class KvLayout:
    """How the KV cache holds the slots' sequences, and so how much room one request has.

    Unified: one pool of `n_ctx` cells; any slot may use most of it, and a request's
    generations share its prompt's cells. Split: every slot has a stream of its own of
    `n_ctx / n_parallel` cells, which holds the prompt and that generation's tokens, and a
    step's attention reads each sequence's own cells only.
    """

    n_ctx: int  # cells in all, as llama.cpp made them
    n_parallel: int
    unified: bool

    @property
    def slot_cells(self) -> int:
        """The most cells one sequence may hold."""
        return self.n_ctx if self.unified else self.n_ctx // self.n_parallel

    def prompt_room(self, generations: int, max_tokens: int) -> int:
        """The most prompt tokens that leave room for every generation's max_tokens."""
        if self.unified:
            return self.n_ctx - generations * max_tokens
        return self.slot_cells - max_tokens

    def describe(self) -> str:
        if self.unified:
            return (
                f"the context holds at most {self.n_ctx:,} tokens (n_ctx {self.n_ctx:,}, "
                f"one unified KV cache shared by {self.n_parallel} slots)"
            )
        return (
            f"a slot holds at most {self.slot_cells:,} tokens (n_ctx {self.n_ctx:,} split "
            f"over {self.n_parallel} slots; --kv-unified lets one document use more)"
        )


@dataclass(frozen=True, slots=True)
class FittedPrompt:
    tokens: list[int]
    truncated: bool


# re-tokenizing content inside the template can merge a token or two differently at its
# edges: a part sized to the budget keeps this many tokens spare
_EDGE_TOKENS = 4


def content_budget(
    tokenizer: Tokenizer, fmt: PromptFormat, request: GenerationRequest, *, layout: KvLayout
) -> int:
    """The most content tokens a prompt of `request` holds beside every generation's
    max_tokens (below 1 when not even the title fits)."""
    base = len(tokenizer.tokenize(fmt.render(request.title, ""), add_special=True))
    room = layout.prompt_room(request.num_generations, request.sampling.max_tokens)
    return room - base - _EDGE_TOKENS


def fit_prompt(
    tokenizer: Tokenizer, fmt: PromptFormat, request: GenerationRequest, *, layout: KvLayout
) -> FittedPrompt:
    """The prompt's ids, which leave room for every generation's max_tokens.

    Content too long is refused (ContextOverflow naming the sizes) or, with
    Truncation.TRUNCATE, cut at a token boundary to fit; a request that cannot fit even
    without content is refused either way.
    """
    n = request.num_generations
    max_tokens = request.sampling.max_tokens
    budget = layout.prompt_room(n, max_tokens)
    tokens = tokenizer.tokenize(fmt.render(request.title, request.content), add_special=True)
    if len(tokens) <= budget:
        return FittedPrompt(tokens, truncated=False)
    asked = f"max_tokens {max_tokens:,}" + (f" x {n} generations" if n > 1 else "")
    where = layout.describe()
    if request.truncation is Truncation.REFUSE:
        raise ContextOverflow(
            "document.content", f"prompt is {len(tokens):,} tokens and {asked}, but {where}"
        )
    base = len(tokenizer.tokenize(fmt.render(request.title, ""), add_special=True))
    if base + 1 > budget:
        raise ContextOverflow(
            "document", f"prompt without content is {base:,} tokens and {asked}, but {where}"
        )
    content = tokenizer.tokenize(request.content.strip(), add_special=False)
    keep = min(len(content), budget - base - 2)
    for _ in range(8):  # re-tokenizing the cut text can merge differently: converge on it
        text = tokenizer.detokenize(content[: max(keep, 0)])
        tokens = tokenizer.tokenize(fmt.render(request.title, text), add_special=True)
        if len(tokens) <= budget:
            return FittedPrompt(tokens, truncated=True)
        keep -= len(tokens) - budget + 1
    raise ContextOverflow("document.content", f"could not truncate the content to fit: {where}")
