"""Fitting a document's prompt into the context, with a stand-in tokenizer (one token per
word, a BOS of its own): kept whole, refused naming the sizes, or truncated to fit."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from genstruct_service.engine.fitting import KvLayout, content_budget, fit_prompt
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
POOL = KvLayout(n_ctx=100, n_parallel=4, unified=True)  # one pool of 100 cells


def request(content: str, *, max_tokens: int = 10, n: int = 1,
            truncation: Truncation = Truncation.REFUSE) -> GenerationRequest:
    return GenerationRequest("title", content, Sampling(max_tokens=max_tokens),
                             num_generations=n, truncation=truncation)


def test_a_prompt_that_fits_is_kept_whole_with_one_bos() -> None:
    tokenizer = WordTokenizer()
    fitted = fit_prompt(tokenizer, FORMAT, request("a b c"), layout=POOL)
    assert not fitted.truncated
    assert fitted.tokens[0] == BOS and fitted.tokens.count(BOS) == 1
    assert tokenizer.detokenize(fitted.tokens) == "T: title C: a b c Q:"


def test_too_long_is_refused_naming_prompt_generations_and_context() -> None:
    words = " ".join(f"w{i}" for i in range(60))
    with pytest.raises(ContextOverflow) as refused:
        fit_prompt(WordTokenizer(), FORMAT, request(words, max_tokens=20, n=2), layout=POOL)
    message = str(refused.value)
    assert "prompt is 65 tokens" in message and "max_tokens 20 x 2 generations" in message
    assert "n_ctx 100" in message


def test_truncation_keeps_the_start_of_the_content_and_fits_exactly() -> None:
    words = [f"w{i}" for i in range(60)]
    tokenizer = WordTokenizer()
    fitted = fit_prompt(tokenizer, FORMAT, request(" ".join(words), max_tokens=50,
                                                   truncation=Truncation.TRUNCATE),
                        layout=POOL)
    assert fitted.truncated and len(fitted.tokens) <= 100 - 50
    kept = tokenizer.detokenize(fitted.tokens).split(" C: ")[1].removesuffix(" Q:").split()
    assert kept == words[: len(kept)] and len(kept) >= 40


def test_no_room_even_without_content_is_refused_when_truncating_too() -> None:
    with pytest.raises(ContextOverflow, match="prompt without content"):
        fit_prompt(WordTokenizer(), FORMAT, request("a", max_tokens=97,
                                                    truncation=Truncation.TRUNCATE),
                   layout=KvLayout(n_ctx=100, n_parallel=1, unified=True))


def test_split_each_generation_holds_the_prompt_in_a_slot_of_its_own() -> None:
    words = " ".join(f"w{i}" for i in range(60))  # a 65-token prompt
    tokenizer = WordTokenizer()
    split = KvLayout(n_ctx=400, n_parallel=4, unified=False)  # 4 slots of 100 cells
    # 65 + 20 fits a slot, whatever the generations: each has its own copy of the prompt
    fitted = fit_prompt(tokenizer, FORMAT, request(words, max_tokens=20, n=4), layout=split)
    assert len(fitted.tokens) == 65 and not fitted.truncated
    assert content_budget(tokenizer, FORMAT, request("", max_tokens=20, n=4), layout=split) == (
        100 - 20 - len(tokenizer.tokenize(FORMAT.render("title", ""), add_special=True)) - 4
    )
    # 65 + 40 does not, though the 400 cells in all would hold it
    with pytest.raises(ContextOverflow) as refused:
        fit_prompt(tokenizer, FORMAT, request(words, max_tokens=40), layout=split)
    message = str(refused.value)
    assert "a slot holds at most 100 tokens" in message and "--kv-unified" in message
    # one pool of the same 400 cells takes it
    assert fit_prompt(tokenizer, FORMAT, request(words, max_tokens=40),
                      layout=KvLayout(n_ctx=400, n_parallel=4, unified=True)).tokens
