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
class FittedPrompt:
    tokens: list[int]
    truncated: bool


# re-tokenizing content inside the template can merge a token or two differently at its
# edges: a part sized to the budget keeps this many tokens spare
_EDGE_TOKENS = 4


def content_budget(
    tokenizer: Tokenizer, fmt: PromptFormat, request: GenerationRequest, *, n_ctx: int
) -> int:
    """The most content tokens a prompt of `request` holds beside every generation's
    max_tokens in n_ctx (below 1 when not even the title fits)."""
    base = len(tokenizer.tokenize(fmt.render(request.title, ""), add_special=True))
    return n_ctx - request.num_generations * request.sampling.max_tokens - base - _EDGE_TOKENS


def fit_prompt(
    tokenizer: Tokenizer, fmt: PromptFormat, request: GenerationRequest, *, n_ctx: int,
    n_parallel: int,
) -> FittedPrompt:
    """The prompt's ids, which leave room for every generation's max_tokens in n_ctx.

    Content too long is refused (ContextOverflow naming the sizes) or, with
    Truncation.TRUNCATE, cut at a token boundary to fit; a request that cannot fit even
    without content is refused either way.
    """
    n = request.num_generations
    max_tokens = request.sampling.max_tokens
    budget = n_ctx - n * max_tokens
    tokens = tokenizer.tokenize(fmt.render(request.title, request.content), add_special=True)
    if len(tokens) <= budget:
        return FittedPrompt(tokens, truncated=False)
    asked = f"max_tokens {max_tokens:,}" + (f" x {n} generations" if n > 1 else "")
    where = (
        f"the context holds at most {n_ctx:,} tokens (n_ctx {n_ctx:,}, "
        f"one unified KV cache shared by {n_parallel} slots)"
    )
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
