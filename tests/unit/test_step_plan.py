"""Step plans without a model: the scheduler, update and a stand-in for the runner, step
after step, with the KV cache kept as the count of cells per slot.

Every plan holds what llama.cpp needs (rows within n_batch, rows with logits within
n_outputs_max, each slot's rows continuing its cells, one run per slot in slot order), and
what the engine promises (no gap below a busy slot, prompt chunks first admitted first and
never starved by drafts, drafts only for a sequence that feeds one sampled token).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import pytest
from genstruct_service.engine.drafts import DraftChooser
from genstruct_service.engine.fitting import FittedPrompt
from genstruct_service.engine.inbox import Inbox
from genstruct_service.engine.ngrams import History, PromptNgrams
from genstruct_service.engine.plan import RowKind, SlotRows, StepPlan, StepResult
from genstruct_service.engine.request import Job, Request, Status
from genstruct_service.engine.scheduler import StepScheduler
from genstruct_service.engine.sequence import Sequence
from genstruct_service.engine.speculation import SpeculationSettings
from genstruct_service.engine.step_cost import STEEP_ROW_COST
from genstruct_service.engine.types import (
    Completed,
    FinishReason,
    GenerationRequest,
    Sampling,
    TokenDelta,
)
from genstruct_service.engine.update import Updater
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EOS = 0
CYCLE = [3, 4, 5, 6, 7]  # prompts repeat it, and samplers mostly follow it: drafts match


class Vocab:
    eog = frozenset({EOS})

    def piece(self, token: int) -> bytes:
        return b"x"

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return [1] * len(text)


class CycleSampler:
    """Follows CYCLE from where its sequence is, now and then (by `rng`) not, or ends."""

    def __init__(self, rng: random.Random, miss: float) -> None:
        self._rng = rng
        self._miss = miss
        self.last = CYCLE[-1]
        self.closed = False

    def sample(self, row: int) -> int:
        assert not self.closed
        roll = self._rng.random()
        if roll < 0.01:
            return EOS
        token = 2 if roll < self._miss else CYCLE[(CYCLE.index(self.last) + 1) % len(CYCLE)]
        if token != 2:
            self.last = token
        return token

    def take_forced(self, token: int) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # never run: jobs queue their events on it
    yield loop
    loop.close()


def make_request(
    loop: asyncio.AbstractEventLoop, rng: random.Random, *, prompt: int, generations: int,
    max_tokens: int, miss: float, spec: SpeculationSettings | None,
    cycle_prompt: bool = True, temperature: float = 0.0,
) -> Request:
    """A request whose samplers follow CYCLE (`miss`: how often not), of `prompt` tokens
    that repeat the cycle (`cycle_prompt`) or never hold it; unseeded where sampled."""
    body = CYCLE if cycle_prompt else [20 + i for i in range(prompt)]
    tokens = [1] + [body[i % len(body)] for i in range(prompt - 1)]
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature)
    ngrams = PromptNgrams(tokens, spec.ngram_min) if spec is not None else None
    job = Job(GenerationRequest("t", "c", sampling, num_generations=generations),
              FittedPrompt(tokens, truncated=False), ngrams, loop)  # fmt: skip
    seqs = [
        Sequence(i, CycleSampler(rng, miss), Vocab(), stops=(), max_tokens=max_tokens,
                 stream=True,
                 history=None if ngrams is None else History(ngrams, spec.ngram_max))  # type: ignore[union-attr]
        for i in range(generations)
    ]  # fmt: skip
    return Request(job, seqs)


class Engine:
    """The scheduler and update, with the KV cache as cells per slot."""

    def __init__(self, *, n_slots: int, n_cells: int, n_batch: int, split: bool,
                 spec: SpeculationSettings | None, offloaded: bool = False) -> None:  # fmt: skip
        drafts = DraftChooser(spec, n_batch, offloaded=offloaded) if spec is not None else None
        self.scheduler = StepScheduler(n_slots, n_cells, n_batch=n_batch, split_kv=split,
                                       drafts=drafts)  # fmt: skip
        self.updater = Updater(self.scheduler, Inbox(max_queue=99, n_parallel=n_slots), drafts)
        self.n_slots, self.n_batch, self.split = n_slots, n_batch, split
        per_slot = 1 + spec.draft_max if spec is not None else 1
        self.outputs_max = min(n_batch, n_slots * per_slot)
        self.cells = [0] * n_slots  # each slot's cells: positions 0 .. cells - 1
        self.plans: list[StepPlan] = []

    def step(self, *, cancelled: bool = False) -> StepPlan:
        before = {seq: seq.pending[:] for r in self.scheduler.running for seq in r.seqs}
        plan = self.scheduler.schedule(cancelled=cancelled)
        self.check(plan, before)
        self.execute(plan)
        self.updater.update(plan, StepResult(True, plan.n_rows, 0.0, time.perf_counter()))
        self.plans.append(plan)
        return plan

    def execute(self, plan: StepPlan) -> None:
        cells = self.cells
        for source, target in plan.copies:
            cells[target] = cells[source]
        for slot, pos in plan.trims:
            cells[slot] = min(cells[slot], pos)
        for slot in plan.clears:
            cells[slot] = 0
        for move in plan.moves:
            cells[move.target] = cells[move.source] if move.source >= 0 else 0
            if move.source >= 0:
                cells[move.source] = 0
        for rows in plan.rows:
            # positions of a sequence are contiguous: its rows continue its cells
            assert rows.first_pos == cells[rows.slot], (rows, cells)
            cells[rows.slot] += len(rows.tokens)

    def check(self, plan: StepPlan, pending: dict[Sequence, list[int]]) -> None:
        rows = plan.rows
        slots = [r.slot for r in rows]
        assert slots == sorted(set(slots)), "one run per slot, in slot order"
        assert plan.n_rows == sum(len(r.tokens) for r in rows) <= self.n_batch
        assert plan.n_logits <= self.outputs_max
        assert all(0 <= r.logits_from <= len(r.tokens) for r in rows)
        running = self.scheduler.running
        if self.split:
            busy = sorted(
                {m.target for m in plan.moves}
                | {s.slot for r in running for s in r.seqs if s.generating and s.slot >= 0}
                - {m.source for m in plan.moves}
            )
            assert busy == list(range(len(busy))), f"a gap below a busy slot: {busy}"
        prompts = [r for r in rows if r.kind is RowKind.PROMPT]
        drafted = sum(len(r.tokens) - 1 for r in rows if r.kind is RowKind.VERIFY)
        decode = plan.n_rows - drafted - plan.prompt_rows
        assert plan.prompt_rows == sum(len(r.tokens) for r in prompts)
        prefilling = [r for r in running if r.status is not Status.GENERATING]
        left = sum(r.prompt_left for r in prefilling)
        # prompt chunks take every row the decode rows leave, drafts only what is left then
        assert plan.prompt_rows == min(left, self.n_batch - decode)
        assert drafted <= max(self.n_batch - decode - left, 0)
        # first admitted first: only the last chunk may be short of its request's prompt
        by_request = {r.request: r for r in prompts}
        chunked = [r for r in prefilling if r in by_request]
        assert chunked == prefilling[: len(chunked)]
        for request in chunked[:-1]:
            assert len(by_request[request].tokens) == request.prompt_left
        for r in rows:
            if r.kind is RowKind.PROMPT:
                assert r.seq is None and r.request is not None
                assert r.first_pos == r.request.computed
                assert r.n_logits == (1 if len(r.tokens) == r.request.prompt_left else 0)
            elif r.kind is RowKind.VERIFY:
                assert r.seq is not None and len(pending[r.seq]) == 1  # a sampled token alone
                assert r.tokens[0] == pending[r.seq][0] and r.logits_from == 0
                assert r.first_pos == r.seq.pos
            else:
                assert r.seq is not None and r.tokens == pending[r.seq][: len(r.tokens)]
                assert r.n_logits == (1 if len(r.tokens) == len(pending[r.seq]) else 0)


arrivals = st.lists(
    st.tuples(
        st.integers(0, 30),  # step it arrives at
        st.integers(1, 60),  # prompt tokens
        st.integers(1, 3),  # generations
        st.integers(1, 24),  # max_tokens
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrivals=arrivals,
    n_slots=st.integers(1, 6),
    batch_extra=st.integers(0, 40),
    split=st.booleans(),
    speculate=st.sampled_from(["off", "always", "auto"]),
    miss=st.sampled_from([0.0, 0.2, 0.7]),
    cancel=st.sets(st.integers(0, 9), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_every_plan_holds_what_llama_cpp_needs_and_the_engine_promises(
    loop: asyncio.AbstractEventLoop, arrivals: list[tuple[int, int, int, int]], n_slots: int,
    batch_extra: int, split: bool, speculate: str, miss: float, cancel: set[int], seed: int,
) -> None:
    rng = random.Random(seed)
    spec = None
    if speculate != "off":
        spec = SpeculationSettings(speculate, draft_max=4, ngram_min=2, ngram_max=4)
    engine = Engine(n_slots=n_slots, n_cells=4096, n_batch=n_slots + batch_extra, split=split,
                    spec=spec)  # fmt: skip
    if spec is not None and engine.scheduler.drafts is not None:
        for rows in range(1, 40):  # rows cost little: auto drafts often
            engine.scheduler.drafts.cost.set(rows, 0.01 + 0.0001 * rows)
    requests: list[Request] = []
    # a step with work decodes at least one row: the last arrival, then every prompt token
    # and every generated token one at a time, is as long as a run can take
    most_steps = 31 + sum(p + min(g, n_slots) * m for _, p, g, m in arrivals)
    for step in range(most_steps + 1):
        for at, prompt, generations, max_tokens in arrivals:
            if at == step:
                request = make_request(loop, rng, prompt=prompt,
                                       generations=min(generations, n_slots),
                                       max_tokens=max_tokens, miss=miss, spec=spec)  # fmt: skip
                requests.append(request)
                engine.scheduler.enqueue(request)
        cancelling = False
        for i in cancel:
            if i < len(requests) and rng.random() < 0.05 and requests[i].status is not Status.DONE:
                requests[i].job.cancelled = True
                cancelling = True
        engine.step(cancelled=cancelling)
        if step > 30 and not engine.scheduler.has_work:
            break
    assert not engine.scheduler.has_work, "a request never finished"
    for request in requests:
        assert request.status is Status.DONE
        assert all(seq.finish_reason is not None and seq.slot == -1 for seq in request.seqs)
        assert all(isinstance(seq.sampler, CycleSampler) and seq.sampler.closed
                   for seq in request.seqs)  # fmt: skip
    assert engine.scheduler.admission.busy_slots == 0
    assert engine.scheduler.admission.reserved_cells == 0


def plain(
    loop: asyncio.AbstractEventLoop, seed: int, prompt: int, max_tokens: int, generations: int = 1
) -> Request:
    """A greedy request whose sampler follows the cycle, without drafts."""
    return make_request(loop, random.Random(seed), prompt=prompt, generations=generations,
                        max_tokens=max_tokens, miss=0.0, spec=None)  # fmt: skip


def drain(job: Job, loop: asyncio.AbstractEventLoop) -> list[object]:
    loop.run_until_complete(asyncio.sleep(0))
    events: list[object] = []
    while not job.queue.empty():
        item = job.queue.get_nowait()
        events.extend(item if isinstance(item, list) else [item])
    return events


def test_a_request_goes_waiting_prefilling_generating_done(
    loop: asyncio.AbstractEventLoop,
) -> None:
    engine = Engine(n_slots=2, n_cells=1000, n_batch=8, split=True, spec=None)
    request = plain(loop, 1, prompt=12, max_tokens=3, generations=2)
    engine.scheduler.enqueue(request)
    assert request.status is Status.WAITING
    plan = engine.step()  # the first 8 prompt tokens
    assert plan.admitted == (request,) and request.status is Status.PREFILLING
    assert [(r.kind, r.slot, len(r.tokens), r.n_logits) for r in plan.rows] == [
        (RowKind.PROMPT, 0, 8, 0)
    ]
    assert [m.target for m in plan.moves] == [0, 1] and request.computed == 8
    plan = engine.step()  # the rest: its first tokens are sampled, the prompt copied
    assert request.status is Status.GENERATING
    assert [(r.kind, len(r.tokens), r.n_logits) for r in plan.rows] == [(RowKind.PROMPT, 4, 1)]
    plan = engine.step()
    assert plan.copies == ((0, 1),)  # before the first decode of the second generation
    assert [(r.kind, r.slot, r.first_pos) for r in plan.rows] == [
        (RowKind.DECODE, 0, 12), (RowKind.DECODE, 1, 12)
    ]
    events = drain(request.job, loop)
    assert events and all(isinstance(e, TokenDelta) for e in events)
    engine.step()  # the third token of each: max_tokens
    assert request.status is Status.DONE
    done = drain(request.job, loop)[-1]
    assert isinstance(done, Completed)
    assert [g.finish_reason for g in done.generations] == [FinishReason.LENGTH] * 2
    assert [g.completion_tokens for g in done.generations] == [3, 3]
    assert engine.step().clears == (0, 1)  # their cells go before the next batch


def test_a_cancelled_request_leaves_before_the_step_and_its_slot_is_taken(
    loop: asyncio.AbstractEventLoop,
) -> None:
    engine = Engine(n_slots=1, n_cells=1000, n_batch=16, split=True, spec=None)
    first, second = plain(loop, 2, prompt=4, max_tokens=50), plain(loop, 3, 4, max_tokens=5)
    engine.scheduler.enqueue(first)
    engine.scheduler.enqueue(second)
    engine.step()
    engine.step()
    first.job.cancelled = True
    plan = engine.step(cancelled=True)
    assert plan.cancelled == (first,) and plan.admitted == (second,)
    assert plan.clears == (0,) and [(m.source, m.target) for m in plan.moves] == [(-1, 0)]
    assert first.status is Status.DONE and first.seqs[0].finish_reason is FinishReason.CANCELLED
    assert drain(first.job, loop) == [TokenDelta(0, "x")] * 2  # nothing after the cancel


def test_a_gap_below_a_busy_slot_is_closed_by_a_move(loop: asyncio.AbstractEventLoop) -> None:
    engine = Engine(n_slots=3, n_cells=1000, n_batch=16, split=True, spec=None)
    short, long = plain(loop, 4, prompt=3, max_tokens=2), plain(loop, 5, 3, max_tokens=20)
    engine.scheduler.enqueue(short)
    engine.scheduler.enqueue(long)
    while short.status is not Status.DONE:
        engine.step()
    assert long.seqs[0].slot == 1
    plan = engine.step()
    assert [(m.source, m.target) for m in plan.moves] == [(1, 0)]
    assert [r.slot for r in plan.rows] == [0] and long.seqs[0].slot == 0


def run_alone(
    engine: Engine, request: Request, loop: asyncio.AbstractEventLoop
) -> tuple[list[SlotRows], Completed]:
    """Steps `request`, alone in `engine`, to its end: the rows that verified its drafts, and
    its last event."""
    engine.scheduler.enqueue(request)
    while request.status is not Status.DONE:
        engine.step()
    verified = [r for plan in engine.plans for r in plan.rows if r.kind is RowKind.VERIFY]
    done = drain(request.job, loop)[-1]
    assert isinstance(done, Completed)
    return verified, done


def test_a_draft_is_verified_on_free_rows_and_its_tokens_kept(
    loop: asyncio.AbstractEventLoop,
) -> None:
    spec = SpeculationSettings("always", draft_max=4, ngram_min=2, ngram_max=4)
    engine = Engine(n_slots=1, n_cells=1000, n_batch=16, split=True, spec=spec)
    request = make_request(loop, random.Random(7), prompt=20, generations=1, max_tokens=12,
                           miss=0.0, spec=spec)  # fmt: skip
    verified, done = run_alone(engine, request, loop)
    assert verified and all(r.n_logits == len(r.tokens) for r in verified)
    # the sampler follows the prompt's cycle: the drafts copy it
    assert 0 < done.accepted_draft_tokens <= done.draft_tokens
    assert done.generations[0].completion_tokens == 12
    assert len(engine.plans) < 12  # fewer steps than tokens


@pytest.mark.parametrize("rows_cost", ["steep", "flat"])
def test_when_nothing_waits_only_the_last_to_end_drafts_where_rows_are_dear(
    loop: asyncio.AbstractEventLoop, rows_cost: str
) -> None:
    spec = SpeculationSettings("auto", draft_max=4, ngram_min=2, ngram_max=4)
    engine = Engine(n_slots=2, n_cells=1000, n_batch=64, split=True, spec=spec)
    drafts = engine.scheduler.drafts
    assert drafts is not None
    for rows, share in STEEP_ROW_COST.items():  # a CPU's, or nearly free rows (a GPU's)
        drafts.cost.set(rows, 0.01 * share if rows_cost == "steep" else 0.01 + 1e-5 * rows)
    rng = random.Random(3)
    short, long, waiting = (
        make_request(loop, rng, prompt=20, generations=1, max_tokens=m, miss=0.0, spec=spec)
        for m in (30, 60, 30)
    )
    for request in (short, long, waiting):
        engine.scheduler.enqueue(request)

    def drafting(steps: int, *, cancelled: bool = False) -> set[Request | None]:
        """The requests that verified a draft in the next `steps` steps."""
        plans = [engine.step(cancelled=cancelled and i == 0) for i in range(steps)]
        return {rows.request for plan in plans for rows in plan.rows if rows.kind is RowKind.VERIFY}

    # a request waits for a slot: each sequence's drafts pay on their own
    assert drafting(4) == {short, long}
    # now nothing waits: these two are the last work, and `long` has the most budget left
    # (30 tokens more, and 3 steps take at most 15 of it)
    waiting.job.cancelled = True
    assert drafting(3, cancelled=True) == ({long} if rows_cost == "steep" else {short, long})
    assert waiting.status is Status.DONE
    assert short.status is long.status is Status.GENERATING


def test_a_request_alone_drafts_for_every_generation_when_nothing_waits(
    loop: asyncio.AbstractEventLoop,
) -> None:
    spec = SpeculationSettings("auto", draft_max=4, ngram_min=2, ngram_max=4)
    engine = Engine(n_slots=2, n_cells=1000, n_batch=64, split=True, spec=spec)
    assert engine.scheduler.drafts is not None
    for rows, share in STEEP_ROW_COST.items():
        engine.scheduler.drafts.cost.set(rows, 0.01 * share)
    request = make_request(loop, random.Random(3), prompt=20, generations=2, max_tokens=60,
                           miss=0.0, spec=spec)  # fmt: skip
    request.seqs[0].max_tokens = 30  # the first generation has less budget left throughout
    engine.scheduler.enqueue(request)
    plans = [engine.step() for _ in range(6)]
    assert request.status is Status.GENERATING
    # greedy and alone, it is planned from itself: both its generations draft
    drafted = {r.seq for plan in plans for r in plan.rows if r.kind is RowKind.VERIFY}
    assert drafted == set(request.seqs)


def test_a_greedy_request_alone_drafts_a_short_match_its_prompt_agrees_on(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # every match is 2 tokens long (ngram_max 2), which alone is not worth a draft where
    # rows are dear; but the prompt repeats its cycle, so every occurrence of the match
    # goes on alike, and the agreed tokens are drafted
    spec = SpeculationSettings("auto", draft_max=4, ngram_min=2, ngram_max=2)
    engine = Engine(n_slots=1, n_cells=1000, n_batch=64, split=True, spec=spec)
    # the prompt ends where the cycle does, so the sampler's first token goes on with it
    request = make_request(loop, random.Random(5), prompt=21, generations=1, max_tokens=24,
                           miss=0.0, spec=spec)  # fmt: skip
    verified, done = run_alone(engine, request, loop)
    # 3 drafted tokens, 4 rows, until the budget left is shorter
    assert len(verified) > 2 and all(len(r.tokens) == 4 for r in verified[:-1])
    assert done.accepted_draft_tokens == done.draft_tokens > 0


def test_a_request_alone_buys_no_draft_whose_rows_pay_only_for_their_own_step(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # every draft is one token (draft_max 1) that the prompt's cycle agrees on: 1.97
    # expected tokens for a step of 2 rows, 1.86 times one where rows are dear. That step
    # decodes faster than one without the draft, but its second row buys tokens slower than
    # drafting keeps over a text (KEPT_LIFT), and a request alone is planned for its text
    spec = SpeculationSettings("auto", draft_max=1, ngram_min=2, ngram_max=2)
    engine = Engine(n_slots=1, n_cells=1000, n_batch=64, split=True, spec=spec)
    request = make_request(loop, random.Random(5), prompt=21, generations=1, max_tokens=24,
                           miss=0.0, spec=spec)  # fmt: skip
    verified, done = run_alone(engine, request, loop)
    assert verified == [] and done.draft_tokens == 0
    assert done.generations[0].completion_tokens == 24


def test_a_request_alone_is_planned_on_the_fixed_row_costs_of_where_its_model_runs(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # the drafts above, of 1 token agreed on: where every layer is on a GPU a second row
    # costs a fifth of a step, and each is bought, whatever the engine measured
    spec = SpeculationSettings("auto", draft_max=1, ngram_min=2, ngram_max=2)

    def run(offloaded: bool) -> list[tuple[int, list[int]]]:
        engine = Engine(n_slots=1, n_cells=1000, n_batch=64, split=True, spec=spec,
                        offloaded=offloaded)  # fmt: skip
        assert engine.scheduler.drafts is not None
        for rows, share in STEEP_ROW_COST.items():  # measured: a CPU's steep curve
            engine.scheduler.drafts.cost.set(rows, 0.01 * share)
        request = make_request(loop, random.Random(5), prompt=21, generations=1,
                               max_tokens=24, miss=0.0, spec=spec)  # fmt: skip
        verified, done = run_alone(engine, request, loop)
        assert done.generations[0].completion_tokens == 24
        return [(r.first_pos, r.tokens) for r in verified]

    assert run(offloaded=False) == []
    on_gpu = run(offloaded=True)
    assert len(on_gpu) >= 10 and all(len(tokens) == 2 for _, tokens in on_gpu)
    assert run(offloaded=True) == on_gpu  # fixed: the same rows on every run


def test_what_a_request_wrote_drafts_for_the_next_unless_its_text_must_repeat(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # prompts that never hold the cycle: until its own text repeats, a request has nothing
    # of its own to draft from, and what an earlier request wrote is the only source
    spec = SpeculationSettings("auto", draft_max=4, ngram_min=2, ngram_max=4)

    def engine() -> Engine:
        e = Engine(n_slots=1, n_cells=1000, n_batch=64, split=True, spec=spec)
        assert e.scheduler.drafts is not None
        for rows in STEEP_ROW_COST:  # nearly free rows (a GPU's)
            e.scheduler.drafts.cost.set(rows, 0.01 + 1e-5 * rows)
        return e

    def request(temperature: float) -> Request:
        return make_request(loop, random.Random(11), prompt=20, generations=1, max_tokens=30,
                            miss=0.0, spec=spec, cycle_prompt=False,
                            temperature=temperature)  # fmt: skip

    def drafted(verified: list[SlotRows]) -> list[tuple[int, list[int], bool]]:
        return [(r.first_pos, r.tokens, r.draft_borrowed) for r in verified]

    busy = engine()
    first, first_done = run_alone(busy, request(0.7), loop)
    first_steps = len(busy.plans)
    assert not any(r.draft_borrowed for r in first)
    assert busy.scheduler.drafts is not None and len(busy.scheduler.drafts.recent) == 30
    # an unseeded request borrows from it before its own text has anything to offer
    busy.plans.clear()
    second, second_done = run_alone(busy, request(0.7), loop)
    assert second[0].draft_borrowed and second[0].first_pos == 21
    assert len(busy.plans) < first_steps
    assert second_done.accepted_draft_tokens > first_done.accepted_draft_tokens
    # a greedy request alone must write the same text whatever ran before: it drafts as in
    # an engine that ran nothing, though the texts it could borrow from would be accepted
    busy.plans.clear()
    after, _ = run_alone(busy, request(0.0), loop)
    fresh, _ = run_alone(engine(), request(0.0), loop)
    assert drafted(after) == drafted(fresh)
    assert not any(r.draft_borrowed for r in after)
