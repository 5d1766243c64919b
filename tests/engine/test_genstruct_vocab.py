"""Mechanics that depend on Genstruct-7B's own tokenizer (Mistral's 32k SentencePiece vocab).

These run on the Genstruct-shaped model only (two layers, random weights, the exact
tokenizer); a grammar fixes what it writes where a test needs known text.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from engine_helpers import GENSTRUCT_SHAPED, collect
from genstruct_service.engine import FinishReason, GenerationRequest, Sampling
from genstruct_service.errors import InvalidRequest
from genstruct_service.prompt import ASSISTANT_MARK, USER_MARK, parse_completion, render_prompt

from bench.corpus import DOCUMENTS

pytestmark = [
    pytest.mark.model,
    pytest.mark.parametrize("model_name", [GENSTRUCT_SHAPED], indirect=True),
]

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def vocab(model_path: str) -> Any:
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path, vocab_only=True, verbose=False)


def literal_grammar(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'root ::= "{escaped}"'


def test_this_is_the_mistral_vocabulary(vocab: Any) -> None:
    assert vocab.n_vocab() == 32000
    assert vocab.token_bos() == BOS and vocab.token_eos() == EOS
    # SentencePiece with a dummy prefix: the text comes back with the space it added
    assert vocab.detokenize(vocab.tokenize(b"Tides", add_bos=False)) == b" Tides"


async def test_the_prompt_has_exactly_one_bos_and_ends_with_the_user_turn(
    engine: Any, vocab: Any
) -> None:
    doc = DOCUMENTS[0]
    prompt = render_prompt(doc.title, doc.content)
    tokens = vocab.tokenize(prompt.encode(), add_bos=True, special=False)
    assert tokens[0] == BOS and tokens.count(BOS) == 1 and EOS not in tokens
    assert vocab.detokenize(tokens[-8:]).decode().endswith(f"{USER_MARK} ")
    # the engine's own tokenization of the same document is that one
    _, done = await collect(engine, GenerationRequest(doc.title, doc.content,
                                                      Sampling(max_tokens=1)))
    assert done.prompt_tokens == len(tokens)


async def test_the_user_turn_stops_the_answer_across_its_pieces(
    engine: Any, vocab: Any
) -> None:
    assert len(vocab.tokenize(USER_MARK.encode(), add_bos=False)) >= 3  # several pieces
    forced = f"What moves the tides? {ASSISTANT_MARK} The Moon. {USER_MARK} And the Sun?"
    deltas, done = await collect(engine, GenerationRequest(
        "Tides", "Tides are caused by the Moon.",
        Sampling(max_tokens=64, temperature=1.0, seed=3), grammar=literal_grammar(forced)))
    (generation,) = done.generations
    assert generation.finish_reason is FinishReason.STOP
    assert generation.text == forced[: forced.index(USER_MARK)]
    assert "[[[U" not in "".join(d.text for d in deltas)  # nothing of it leaked
    parsed = parse_completion(generation.text)
    assert (parsed.user, parsed.assistant) == ("What moves the tides?", "The Moon.")


async def test_a_callers_stop_string_splitting_a_piece_is_cut(engine: Any) -> None:
    forced = "The tides turn twice a day."
    _, done = await collect(engine, GenerationRequest(
        "Tides", "Tides.", Sampling(max_tokens=32, temperature=0.0, stop=("s tu",)),
        grammar=literal_grammar(forced)))
    (generation,) = done.generations
    assert generation.finish_reason is FinishReason.STOP
    assert generation.text == "The tide"


async def least_constrained_budget(engine: Any) -> int:
    request = GenerationRequest("t", "c", Sampling(max_tokens=1), constrained=True)
    with pytest.raises(InvalidRequest) as refused:
        await anext(engine.generate(request))
    found = re.search(r"needs at least (\d+) tokens", str(refused.value))
    assert found, refused.value
    return int(found.group(1))


async def test_constrained_mode_parses_even_at_the_smallest_budget(engine: Any) -> None:
    budget = await least_constrained_budget(engine)
    for seed in range(6):
        doc = DOCUMENTS[seed % len(DOCUMENTS)]
        _, done = await collect(engine, GenerationRequest(
            doc.title, doc.content, Sampling(max_tokens=budget, temperature=1.0, seed=seed),
            constrained=True))
        (generation,) = done.generations
        assert generation.completion_tokens <= budget
        parsed = parse_completion(generation.text)
        assert parsed.parsed and parsed.user and parsed.assistant, generation.text
