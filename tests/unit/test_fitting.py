"""Fitting a document's prompt into the context, with a stand-in tokenizer (one token per
word, a BOS of its own): kept whole, refused naming the sizes, or truncated to fit."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from genstruct_service.engine.fitting import fit_prompt
from genstruct_service.engine.types import GenerationRequest, PromptFormat, Sampling, Truncation
from genstruct_service.errors import ContextOverflow

BOS = -1


class WordTokenizer:
    """Each word is a token; ids index a growing vocabulary, so detokenize inverts tokenize."""

    def __init__(self) -> None:
        self.words: list[str] = []

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        ids = [BOS] if add_special else []
        for word in text.split():
            if word not in self.words:
                self.words.append(word)
            ids.append(self.words.index(word))
        return ids

    def detokenize(self, tokens: Sequence[int]) -> str:
        return " ".join(self.words[t] for t in tokens if t != BOS)


FORMAT = PromptFormat(render=lambda title, content: f"T: {title} C: {content} Q:", stop="Q:")


def request(content: str, *, max_tokens: int = 10, n: int = 1,
            truncation: Truncation = Truncation.REFUSE) -> GenerationRequest:
    return GenerationRequest("title", content, Sampling(max_tokens=max_tokens),
                             num_generations=n, truncation=truncation)


def test_a_prompt_that_fits_is_kept_whole_with_one_bos() -> None:
    tokenizer = WordTokenizer()
    fitted = fit_prompt(tokenizer, FORMAT, request("a b c"), n_ctx=100, n_parallel=4)
    assert not fitted.truncated
    assert fitted.tokens[0] == BOS and fitted.tokens.count(BOS) == 1
    assert tokenizer.detokenize(fitted.tokens) == "T: title C: a b c Q:"


def test_too_long_is_refused_naming_prompt_generations_and_context() -> None:
    words = " ".join(f"w{i}" for i in range(60))
    with pytest.raises(ContextOverflow) as refused:
        fit_prompt(WordTokenizer(), FORMAT, request(words, max_tokens=20, n=2), n_ctx=100,
                   n_parallel=4)
    message = str(refused.value)
    assert "prompt is 65 tokens" in message and "max_tokens 20 x 2 generations" in message
    assert "n_ctx 100" in message


def test_truncation_keeps_the_start_of_the_content_and_fits_exactly() -> None:
    words = [f"w{i}" for i in range(60)]
    tokenizer = WordTokenizer()
    fitted = fit_prompt(tokenizer, FORMAT, request(" ".join(words), max_tokens=50,
                                                   truncation=Truncation.TRUNCATE),
                        n_ctx=100, n_parallel=4)
    assert fitted.truncated and len(fitted.tokens) <= 100 - 50
    kept = tokenizer.detokenize(fitted.tokens).split(" C: ")[1].removesuffix(" Q:").split()
    assert kept == words[: len(kept)] and len(kept) >= 40


def test_no_room_even_without_content_is_refused_when_truncating_too() -> None:
    with pytest.raises(ContextOverflow, match="prompt without content"):
        fit_prompt(WordTokenizer(), FORMAT, request("a", max_tokens=97,
                                                    truncation=Truncation.TRUNCATE),
                   n_ctx=100, n_parallel=1)
