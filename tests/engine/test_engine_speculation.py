"""Speculation with real llama.cpp: drafts verified in the batch must not change the text.

Each test runs the same requests on an engine that drafts wherever it can
(`--speculation always`) and on one that never does, and compares what they write: greedy
decoding must give the same text, and sampling with a seed the same text too (one random
draw per generated token either way). The documents are ones where no near-tie decides
(a batch of several rows can compute logits a hair apart from one row alone).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from engine_helpers import GEMMA, collect, joined
from genstruct_service.engine import Completed, FinishReason, GenerationRequest, Sampling
from genstruct_service.engine.speculation import SpeculationSettings

from bench.corpus import DOCUMENTS

pytestmark = pytest.mark.model

# corpus documents whose greedy text has no near-tie, per model: random weights give flat
# logits, where even another request in the batch changes the text of most documents
STABLE = {GEMMA: (0, 1, 2, 3, 4, 5)}
STABLE_RANDOM = (0,)


@pytest.fixture(scope="module")
def stable(model_name: str) -> tuple[int, ...]:
    return STABLE.get(model_name, STABLE_RANDOM)


def _engine(model_path: str, model_name: str, mode: str) -> Any:
    from genstruct_service.engine.llama import LlamaEngine
    from genstruct_service.prompt import GENSTRUCT_FORMAT

    return LlamaEngine(
        model_path, prompt_format=GENSTRUCT_FORMAT, model_name=model_name, n_parallel=4,
        n_ctx=4096, n_batch=256, n_threads=2, max_queue=16,
        speculation=SpeculationSettings(mode=mode),
    )


@pytest.fixture(scope="module")
def drafting(model_path: str, model_name: str) -> Iterator[Any]:
    engine = _engine(model_path, model_name, "always")
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def plain(model_path: str, model_name: str) -> Iterator[Any]:
    engine = _engine(model_path, model_name, "off")
    yield engine
    asyncio.run(engine.close())


def req(i: int, **kw: Any) -> GenerationRequest:
    doc = DOCUMENTS[i]
    extra = {k: kw.pop(k) for k in ("num_generations", "constrained") if k in kw}
    stream = kw.pop("stream", False)
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 96)
    kw.setdefault("seed", 11)
    return GenerationRequest(doc.title, doc.content, Sampling(**kw), stream=stream, **extra)


async def both(
    drafting: Any, plain: Any, request: GenerationRequest
) -> tuple[Completed, Completed]:
    (_, a), (_, b) = await asyncio.gather(collect(drafting, request), collect(plain, request))
    return a, b


def same_output(a: Completed, b: Completed) -> None:
    assert [(g.text, g.finish_reason, g.completion_tokens) for g in a.generations] == [
        (g.text, g.finish_reason, g.completion_tokens) for g in b.generations
    ]


async def test_greedy_text_is_the_same_with_and_without_drafts(
    drafting: Any, plain: Any, model_name: str, stable: tuple[int, ...]
) -> None:
    results = [await both(drafting, plain, req(i)) for i in stable]
    for a, b in results:
        same_output(a, b)
        assert b.draft_tokens == b.accepted_draft_tokens == 0
        assert 0 <= a.accepted_draft_tokens <= a.draft_tokens
    drafted = sum(a.draft_tokens for a, _ in results)
    accepted = sum(a.accepted_draft_tokens for a, _ in results)
    if model_name == GEMMA:  # a real model restates its document: most drafts are accepted
        assert drafted > 0 and accepted > drafted // 4
    # every accepted token is one generated without a step of its own
    assert accepted <= sum(a.completion_tokens for a, _ in results)


async def test_stop_strings_cut_the_same_text_inside_accepted_drafts(
    drafting: Any, plain: Any
) -> None:
    _, full = await collect(plain, req(0))
    text = full.generations[0].text
    assert len(text) > 40
    for start in range(8, len(text) - 8, max(len(text) // 8, 1)):
        stop = text[start : start + 5]
        if not stop.strip():
            continue
        a, b = await both(drafting, plain, req(0, stop=(stop,)))
        same_output(a, b)
        assert a.generations[0].finish_reason is FinishReason.STOP
        assert stop not in a.generations[0].text


async def test_max_tokens_is_exact_whatever_the_draft(drafting: Any, plain: Any) -> None:
    for max_tokens in (1, 2, 3, 5, 8, 13, 21, 34):
        a, b = await both(drafting, plain, req(1, max_tokens=max_tokens))
        same_output(a, b)
        assert a.generations[0].completion_tokens <= max_tokens


async def test_an_end_of_generation_token_inside_a_draft_ends_it_there(
    drafting: Any, plain: Any
) -> None:
    # The small models rarely end on their own, so a token the model writes midway through
    # its answer is made an end-of-generation token on both engines for this test: drafts
    # copy the text around it, so it is sampled at a drafted row.
    _, full = await collect(plain, req(1))
    text = full.generations[0].text
    ids = plain._tokenizer.tokenize(text, add_special=False)
    saved = plain._eog_set, drafting._eog_set
    try:
        # the text re-tokenized may merge differently from what was generated: take the
        # first token from the middle on that does end the plain engine's generation
        for token in ids[len(ids) // 2 :][:8]:
            plain._eog_set = drafting._eog_set = saved[0] | {token}
            a, b = await both(drafting, plain, req(1))
            if b.generations[0].finish_reason is FinishReason.EOS:
                break
    finally:
        plain._eog_set, drafting._eog_set = saved
    same_output(a, b)
    assert a.generations[0].finish_reason is FinishReason.EOS
    assert a.generations[0].completion_tokens < full.generations[0].completion_tokens


async def test_constrained_output_is_the_same(
    drafting: Any, plain: Any, stable: tuple[int, ...]
) -> None:
    for i in stable[:3]:
        a, b = await both(drafting, plain, req(i, constrained=True, max_tokens=64))
        same_output(a, b)
        assert "[[[Assistant]]]" in a.generations[0].text


async def test_sampling_verifies_drafts_and_a_seed_repeats_its_text(
    drafting: Any, model_name: str
) -> None:
    # With sampling a hair of difference in the logits can change a draw (so can another
    # request in the same batch, with or without drafts): compare a seed with itself.
    sampled = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": 5}
    for i in (0, 1, 2):
        (_, a), (_, b) = [await collect(drafting, req(i, num_generations=2, **sampled))
                          for _ in range(2)]
        same_output(a, b)
        assert a.generations[0].text != a.generations[1].text  # seeds 5 and 6
        if model_name == GEMMA:  # random weights sample text that rarely repeats
            assert a.draft_tokens > 0


async def test_streamed_text_is_the_final_text(drafting: Any) -> None:
    deltas, done = await collect(drafting, req(2, stream=True))
    assert joined(deltas, 0) == done.generations[0].text


async def test_cancelling_a_drafting_request_leaves_the_other_intact(
    drafting: Any, plain: Any, stable: tuple[int, ...]
) -> None:
    _, expected = await collect(plain, req(stable[0]))
    victim = drafting.generate(req(4, stream=True, max_tokens=200))
    await anext(victim)  # it is generating (and drafting) now
    survivor = asyncio.ensure_future(collect(drafting, req(stable[0])))
    await asyncio.sleep(0)
    await victim.aclose()
    _, done = await asyncio.wait_for(survivor, 60)
    same_output(done, expected)
    assert drafting.stats().busy_slots == 0
