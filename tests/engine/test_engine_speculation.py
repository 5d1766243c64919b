"""Speculation with real llama.cpp: drafts verified in the batch must not change the text.

Each test runs the same requests on an engine that drafts wherever it can
(`--speculation always`) and on one that never does. A batch of several rows (a verified
draft) can compute logits a hair apart from one row alone, and how far apart depends on the
CPU's kernels, so greedy text with drafts is held to the model's argmax chain decoded one
row at a time (GreedyReference): it may leave that chain only where the chain's top two
logits all but tie (NEAR_TIE). Where a test compares the two engines' text exactly, it
does so on documents whose greedy text is the same on both here, found first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from engine_helpers import GEMMA, GreedyReference, collect, joined
from genstruct_service.engine import Completed, FinishReason, GenerationRequest, Sampling
from genstruct_service.engine.speculation import SpeculationSettings
from genstruct_service.errors import ContextOverflow

from bench.corpus import DOCUMENTS

pytestmark = pytest.mark.model

DOCS = range(6)
# The most a batch's logits were seen to move a choice here is 0.05 (top logits near 20);
# a draft token accepted wrongly is, but for a rare coincidence, a logit or more behind.
NEAR_TIE = 0.25
N_CTX, N_BATCH = 4096, 256


def _engine(model_path: str, model_name: str, mode: str) -> Any:
    from genstruct_service.engine.llama import LlamaEngine
    from genstruct_service.prompt import GENSTRUCT_FORMAT

    return LlamaEngine(
        model_path, prompt_format=GENSTRUCT_FORMAT, model_name=model_name, n_parallel=4,
        n_ctx=N_CTX, n_batch=N_BATCH, n_threads=2, max_queue=16, flash_attn="on",
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


@pytest.fixture
def auto(model_path: str, model_name: str) -> Iterator[Any]:
    engine = _engine(model_path, model_name, "auto")
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def reference(model_path: str) -> GreedyReference:
    return GreedyReference(model_path, n_ctx=N_CTX, n_batch=N_BATCH, flash_attn=True)


@pytest.fixture(scope="module")
def agreeing_runs(drafting: Any, plain: Any) -> dict[int, Completed]:
    """Documents whose greedy text is the same with and without drafts on this machine, with
    the drafting engine's result for each."""

    async def find() -> dict[int, Completed]:
        found = {}
        for i in DOCS:
            a, b = await both(drafting, plain, req(i))
            if a.generations[0].text == b.generations[0].text:
                found[i] = a
        return found

    return asyncio.run(find())


@pytest.fixture(scope="module")
def agreeing(agreeing_runs: dict[int, Completed]) -> list[int]:
    return list(agreeing_runs)


def follows_chain(
    reference: GreedyReference, engine: Any, request: GenerationRequest, done: Completed
) -> None:
    """Each generation is the greedy chain, or leaves it only at a near-tie."""
    prompt = list(engine._prepare(request)[0].tokens)
    for g in done.generations:
        margin = reference.departure(prompt, g.text, g.completion_tokens)
        assert margin is None or margin < NEAR_TIE, (g.text, margin)


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


async def test_greedy_text_with_drafts_is_the_greedy_chain(
    drafting: Any, plain: Any, model_name: str, reference: GreedyReference
) -> None:
    results = []
    for i in DOCS:
        a, b = await both(drafting, plain, req(i))
        follows_chain(reference, drafting, req(i), a)
        follows_chain(reference, plain, req(i), b)
        assert b.draft_tokens == b.accepted_draft_tokens == 0
        assert 0 <= a.accepted_draft_tokens <= a.draft_tokens
        results.append(a)
    drafted = sum(a.draft_tokens for a in results)
    accepted = sum(a.accepted_draft_tokens for a in results)
    if model_name == GEMMA:  # a real model restates its document: many drafts are accepted
        assert drafted > 0 and accepted > drafted // 8
    # every accepted token is one generated without a step of its own
    assert accepted <= sum(a.completion_tokens for a in results)


async def test_some_documents_write_the_same_text_with_and_without_drafts(
    agreeing_runs: dict[int, Completed], model_name: str
) -> None:
    # the comparisons below need some; a real model has few near-ties
    assert len(agreeing_runs) >= (2 if model_name == GEMMA else 1)
    # and the same text was written with drafts, some of them accepted
    runs = agreeing_runs.values()
    assert sum(a.accepted_draft_tokens for a in runs) > 0
    assert sum(a.draft_tokens for a in runs) >= sum(a.accepted_draft_tokens for a in runs)


async def test_stop_strings_cut_the_text_inside_accepted_drafts(
    drafting: Any, plain: Any
) -> None:
    accepted = {drafting: 0, plain: 0}  # draft tokens accepted in the runs that were cut
    for engine in (drafting, plain):
        _, full = await collect(engine, req(0))
        text = full.generations[0].text
        assert len(text) > 40
        for start in range(8, len(text) - 8, max(len(text) // 8, 1)):
            stop = text[start : start + 5]
            if not stop.strip():
                continue
            _, cut = await collect(engine, req(0, stop=(stop,)))
            assert cut.generations[0].text == text[: text.index(stop)]
            assert cut.generations[0].finish_reason is FinishReason.STOP
            accepted[engine] += cut.accepted_draft_tokens
    assert accepted[drafting] > 0 and accepted[plain] == 0


async def test_max_tokens_is_exact_whatever_the_draft(
    drafting: Any, plain: Any, agreeing: list[int]
) -> None:
    drafted = 0
    for max_tokens in (1, 2, 3, 5, 8, 13, 21, 34):
        a, b = await both(drafting, plain, req(agreeing[0], max_tokens=max_tokens))
        same_output(a, b)
        assert a.generations[0].completion_tokens <= max_tokens
        drafted += a.draft_tokens
    assert drafted > 0  # drafts were verified on the way to some of those limits


async def test_an_end_of_generation_token_inside_a_draft_ends_it_there(
    drafting: Any, plain: Any, agreeing_runs: dict[int, Completed]
) -> None:
    # The small models rarely end on their own, so a token the model writes midway through
    # its answer is made an end-of-generation token on both engines for this test: drafts
    # copy the text around it, so it is sampled at a drafted row. The document whose text
    # took the most drafts is the one to end that way.
    doc = max(agreeing_runs, key=lambda i: agreeing_runs[i].accepted_draft_tokens)
    _, full = await collect(plain, req(doc))
    text = full.generations[0].text
    ids = plain._tokenizer.tokenize(text, add_special=False)
    saved = plain._tokenizer.eog, drafting._tokenizer.eog
    # Tokens first written in the second half: the generation runs a while (drafting) first.
    half = len(ids) // 2
    later = [token for token in dict.fromkeys(ids[half:]) if ids.index(token) >= half]
    try:
        # the text re-tokenized may merge differently from what was generated: take the
        # first such token that does end the plain engine's generation after drafts were
        # verified on the drafting one
        for token in later[:12]:
            plain._tokenizer.eog = drafting._tokenizer.eog = saved[0] | {token}
            a, b = await both(drafting, plain, req(doc))
            if b.generations[0].finish_reason is FinishReason.EOS and a.accepted_draft_tokens:
                break
    finally:
        plain._tokenizer.eog, drafting._tokenizer.eog = saved
    same_output(a, b)
    assert a.generations[0].finish_reason is FinishReason.EOS
    assert a.generations[0].completion_tokens < full.generations[0].completion_tokens
    assert a.draft_tokens > 0 and a.accepted_draft_tokens > 0


async def test_constrained_output_is_the_same(
    drafting: Any, plain: Any, agreeing: list[int]
) -> None:
    for i in agreeing[:3]:
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


def _learn_that_drafts_pay(engine: Any) -> None:
    """What an engine would learn from other requests if rows cost nothing and every draft
    were accepted."""
    for _ in range(40):
        for rows in range(1, N_BATCH + 1):
            engine._drafts.cost.observe(rows, 0.01)
    for _ in range(400):
        for match in range(engine._spec.ngram_max + 1):
            for borrowed in (False, True):
                engine._drafts.acceptance.record(match, 16, 16, borrowed=borrowed)


def _learn_that_drafts_never_pay(engine: Any) -> None:
    """What an engine would learn from other requests if every row cost a step of its own
    and no draft were accepted."""
    for _ in range(120):
        for rows in range(1, N_BATCH + 1):
            engine._drafts.cost.observe(rows, 0.01 * rows)
    for _ in range(400):
        for match in range(engine._spec.ngram_max + 1):
            for borrowed in (False, True):
                engine._drafts.acceptance.record(match, 16, 0, borrowed=borrowed)


async def test_auto_plans_a_seeded_request_run_alone_from_itself(
    auto: Any, model_path: str, model_name: str
) -> None:
    sampled = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": 5,
               "max_tokens": 160}  # fmt: skip
    requests = [req(i, **sampled) for i in range(3)] + [req(3, num_generations=2, **sampled)]
    fresh = [(await collect(auto, r))[1] for r in requests]
    # what they wrote is now in the texts other requests borrow drafts from, as is what
    # it would learn if every borrowed draft were accepted: neither moves a repeatable
    # request alone
    assert len(auto._drafts.recent) > 0
    _learn_that_drafts_pay(auto)
    learned = [(await collect(auto, r))[1] for r in requests]
    # another engine, with step costs timed afresh: a restart
    other = _engine(model_path, model_name, "auto")
    try:
        restarted = [(await collect(other, r))[1] for r in requests]
    finally:
        await other.close()
    for a, b, c in zip(fresh, learned, restarted, strict=True):
        same_output(a, b)
        same_output(a, c)
        assert a.draft_tokens == b.draft_tokens == c.draft_tokens
        assert a.accepted_draft_tokens == b.accepted_draft_tokens == c.accepted_draft_tokens
    # beside another request its batches are shared, and a seeded sampled request is not
    # drafted: two join one that runs from before they come until after they end
    running = auto.generate(req(4, stream=True, **{**sampled, "max_tokens": 400},
                                ignore_eos=True))
    await anext(running)
    pair = await asyncio.gather(*(collect(auto, req(i, **sampled)) for i in (0, 1)))
    await running.aclose()
    assert [done.draft_tokens for _, done in pair] == [0, 0]
    # without a seed the live plan applies: taught that drafts never pay, the same requests
    # draft nothing, where seeded and alone they drafted from themselves
    _learn_that_drafts_never_pay(auto)
    unseeded = [(await collect(auto, req(i, **{**sampled, "seed": None})))[1] for i in range(3)]
    assert sum(u.draft_tokens for u in unseeded) == 0
    if model_name == GEMMA:  # it copies its documents; random weights sample noise
        assert sum(a.draft_tokens for a in fresh[:3]) > 0


async def test_streamed_text_is_the_final_text(drafting: Any) -> None:
    deltas, done = await collect(drafting, req(2, stream=True))
    assert joined(deltas, 0) == done.generations[0].text
    assert done.accepted_draft_tokens > 0  # some steps streamed several tokens at once


async def test_cancelling_a_drafting_request_leaves_the_other_intact(
    drafting: Any, reference: GreedyReference
) -> None:
    victim = drafting.generate(req(4, stream=True, max_tokens=200))
    await anext(victim)  # it is generating (and drafting) now
    survivor = asyncio.ensure_future(collect(drafting, req(0)))
    await asyncio.sleep(0)
    await victim.aclose()
    _, done = await asyncio.wait_for(survivor, 60)
    # the victim's rows shared its batches: held to the chain, not to a text of its own
    follows_chain(reference, drafting, req(0), done)
    assert done.generations[0].completion_tokens == 96
    assert drafting.stats().busy_slots == 0


async def test_a_generation_past_the_sliding_window_is_the_greedy_chain(
    drafting: Any, reference: GreedyReference
) -> None:
    """Gemma 3's sliding-window layers keep only their window and a ubatch of cells in each
    slot (768 here), dropping older ones; the reference keeps every cell. A generation that
    runs past that, drafts rejected on the way, must still be the chain of the full cache."""
    kept = 512 + N_BATCH  # Gemma 3's window and a ubatch: the slot's cells of those layers
    sampling = Sampling(temperature=0.0, max_tokens=96, seed=11)
    request = GenerationRequest("Field notes", DOCUMENTS[0].content, sampling)
    for doc in DOCUMENTS[1:]:  # the longest document of the corpus's texts that fits a slot
        longer = GenerationRequest("Field notes", f"{request.content}\n\n{doc.content}", sampling)
        try:
            drafting._prepare(longer)
        except ContextOverflow:
            break
        request = longer
    _, done = await collect(drafting, request)
    prompt = drafting._prepare(request)[0].tokens
    assert len(prompt) + done.generations[0].completion_tokens > kept, len(prompt)
    follows_chain(reference, drafting, request, done)
    assert done.draft_tokens > done.accepted_draft_tokens  # a draft was rejected on the way
