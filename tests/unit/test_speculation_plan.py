"""Drafting and planning for speculation, without a model: n-gram drafts from the prompt and
the generated text, the acceptance estimate, the step-cost model and the per-step plan."""

from __future__ import annotations

import pytest
from genstruct_service.engine.ngrams import History, PromptNgrams, RecentTexts
from genstruct_service.engine.speculation import (
    AGREED_ACCEPTANCE,
    BORROWED_START,
    CONTESTED,
    KEPT_LIFT,
    Acceptance,
    Candidate,
    DraftRecord,
    SpeculationSettings,
    compared,
    plan_drafts,
)
from genstruct_service.engine.step_cost import (
    STEEP_ROW_COST,
    BatchShape,
    StepCost,
    calibration_rows,
)
from hypothesis import given
from hypothesis import strategies as st


def history(prompt: list[int], generated: list[int], n: int = 3, n_max: int = 8) -> History:
    h = History(PromptNgrams(prompt, n), n_max)
    for token in generated:
        h.append(token)
    return h


def test_a_suffix_found_in_the_prompt_drafts_what_followed_it() -> None:
    prompt = [1, 2, 10, 11, 12, 13, 14, 15, 3, 4]
    h = history(prompt, [7, 10, 11, 12])
    draft = h.draft(limit=3)
    assert draft is not None
    assert draft.tokens == [13, 14, 15]
    assert draft.match == 3


def test_the_draft_is_cut_to_the_limit_and_may_run_into_generated_text() -> None:
    prompt = [5, 6, 7, 8]
    h = history(prompt, [9, 5, 6, 7])  # the prompt's tail is followed by 8, then 9 (generated)
    draft = h.draft(limit=5)
    assert draft is not None
    assert draft.tokens == [8, 9, 5, 6, 7]  # up to the end of what exists
    assert h.draft(limit=1).tokens == [8]  # type: ignore[union-attr]


def test_a_match_that_runs_into_the_present_drafts_the_loop_again() -> None:
    # past the end of what exists the text goes on as it did after the match: the span
    # again, as drafting token by token from the last n-gram would give
    h = history([5, 6, 7, 8], [9, 5, 6, 7])
    assert h.draft(limit=12).tokens == [8, 9, 5, 6, 7] * 2 + [8, 9]  # type: ignore[union-attr]
    loop = history([1, 2, 3, 4], [7, 8, 9, 7, 8, 9, 7, 8, 9])
    draft = loop.draft(limit=10)
    assert draft is not None and draft.tokens == [7, 8, 9, 7, 8, 9, 7, 8, 9, 7]
    # a peer's text is not extended: what it will write is not known
    _, second = generations([1, 2, 3, 4], [[5, 6, 7, 5, 6, 7], [5, 6]])
    assert second.draft(limit=10).tokens == [7, 5, 6, 7]  # type: ignore[union-attr]


def test_the_longest_match_wins_over_a_more_recent_shorter_one() -> None:
    # [20, 1, 2, 3] -> 30 occurs early; [1, 2, 3] -> 40 occurs later with a different lead
    prompt = [20, 1, 2, 3, 30, 31, 99, 21, 1, 2, 3, 40, 41]
    h = history(prompt, [20, 1, 2, 3])
    draft = h.draft(limit=2)
    assert draft is not None
    assert draft.tokens == [30, 31]
    assert draft.match == 4


def test_matches_in_generated_text_count_and_the_suffix_itself_does_not() -> None:
    h = history([100, 101, 102], [1, 2, 3, 4, 1, 2, 3])
    draft = h.draft(limit=4)
    assert draft is not None
    assert draft.tokens == [4, 1, 2, 3]
    assert history([100, 101, 102], [1, 2, 3]).draft(limit=4) is None  # only itself


def test_no_draft_without_a_match_or_with_no_budget() -> None:
    h = history([1, 2, 3, 4, 5], [6, 7, 8])
    assert h.draft(limit=4) is None
    assert history([1, 2, 3, 4, 5], [1, 2, 3]).draft(limit=0) is None


def test_match_length_is_capped_at_ngram_max() -> None:
    prompt = [*range(50), 999, *range(50)]
    h = history(prompt, list(range(20)), n=3, n_max=6)
    draft = h.draft(limit=2)
    assert draft is not None
    assert draft.match == 6
    assert draft.tokens == [20, 21]


@given(
    st.lists(st.integers(0, 5), min_size=0, max_size=60),
    st.lists(st.integers(0, 5), min_size=0, max_size=30),
    st.integers(1, 4),
    st.integers(1, 12),
)
def test_a_draft_is_always_a_true_continuation_of_an_earlier_match(
    prompt: list[int], generated: list[int], n: int, limit: int
) -> None:
    h = history(prompt, generated, n=n, n_max=n + 3)
    draft = h.draft(limit)
    full = prompt + generated
    if draft is None:
        return
    assert 1 <= len(draft.tokens) <= limit
    assert n <= draft.match <= n + 3
    # some earlier position `at` (not the end) is preceded by the last `match` tokens and
    # followed by the draft, in the text with the draft written after it (a match that runs
    # into the present goes on with the draft itself)
    suffix = full[len(full) - draft.match :]
    drafted = full + draft.tokens
    assert any(
        full[at - draft.match : at] == suffix
        and drafted[at : at + len(draft.tokens)] == draft.tokens
        for at in range(draft.match, len(full))
    )


def test_the_other_occurrences_of_the_suffix_say_how_far_a_draft_is_agreed() -> None:
    # a line repeated with a counter in it (50, 51): both earlier lines go on with 9, then
    # part at the counter, so the draft is agreed for one token and contested at the next
    line = history([7, 8, 9, 50, 7, 8, 9, 51, 7], [8], n=2)
    draft = line.draft(limit=4)
    assert draft is not None
    assert draft.tokens == [9, 51, 7, 8] and draft.match == 2  # the most recent line
    assert (draft.agreed, draft.contested) == (1, True)
    # lines that go on alike agree on the whole draft, and nothing is contested
    same = history([7, 8, 9, 50, 7, 8, 9, 50, 7], [8], n=2).draft(limit=4)
    assert same is not None and (same.agreed, same.contested) == (4, False)
    # an n-gram that occurs once: no other occurrence says anything
    once = history([7, 8, 9, 50, 60], [7, 8], n=2).draft(limit=3)
    assert once is not None and once.tokens == [9, 50, 60]
    assert (once.agreed, once.contested) == (0, False)
    # an occurrence parting at the first token contests the draft from its start
    first = history([7, 8, 30, 7, 8, 31], [7, 8], n=2).draft(limit=2)
    assert first is not None and first.tokens == [31, 7]
    assert (first.agreed, first.contested) == (0, True)
    # cut shorter, a draft keeps what it knew of the tokens it kept
    assert (draft.cut(1).agreed, draft.cut(1).contested) == (1, False)
    assert (draft.cut(3).agreed, draft.cut(3).contested) == (1, True)
    assert draft.cut(3).tokens == [9, 51, 7]


def generations(prompt: list[int], texts: list[list[int]], n: int = 2) -> list[History]:
    """One request's generations, sharing the prompt's index and each other's text."""
    ngrams = PromptNgrams(prompt, n)
    hs = [History(ngrams, 8) for _ in texts]
    History.share(hs)
    for h, text in zip(hs, texts, strict=True):
        for token in text:
            h.append(token)
    return hs


def test_a_generation_drafts_from_what_another_generation_wrote() -> None:
    # the prompt never has 7 after 5, 6; the first generation wrote it, so the second drafts it
    _, second = generations([1, 2, 3, 4], [[5, 6, 7, 8, 9], [5, 6]])
    draft = second.draft(limit=3)
    assert draft is not None and draft.tokens == [7, 8, 9]
    # a peer's draft may run to the end of what it wrote, not past it
    assert second.draft(limit=10) == draft
    # and the longest match wins wherever it is: the prompt's 3-token match beats the peer's 2
    _, third = generations([1, 5, 6, 40, 41], [[9, 5, 6, 7], [1, 5, 6]])
    found = third.draft(limit=2)
    assert found is not None and found.tokens == [40, 41] and found.match == 3
    # without sharing, the same text has nothing to draft from
    alone = History(PromptNgrams([1, 2, 3, 4], 2), 8)
    for token in (5, 6):
        alone.append(token)
    assert alone.draft(limit=3) is None


@given(
    prompt=st.lists(st.integers(0, 3), max_size=30),
    texts=st.lists(st.lists(st.integers(0, 3), max_size=30), min_size=2, max_size=3),
    limit=st.integers(1, 6),
)
def test_a_draft_continues_an_earlier_match_in_its_own_text_or_a_peers(
    prompt: list[int], texts: list[list[int]], limit: int
) -> None:
    hs = generations(prompt, texts)
    for i, h in enumerate(hs):
        draft = h.draft(limit)
        if draft is None:
            continue
        own = prompt + texts[i]
        suffix = own[len(own) - draft.match :]
        # its own text goes on with the draft; a peer's is taken as written
        candidates = [(own + draft.tokens, range(draft.match, len(own)))] + [
            (prompt + texts[j], range(len(prompt) + 1, len(prompt) + len(texts[j]) + 1))
            for j in range(len(hs)) if j != i
        ]
        assert any(
            full[at - draft.match : at] == suffix
            and full[at : at + len(draft.tokens)] == draft.tokens
            for full, ats in candidates
            for at in ats
        )
        assert 0 <= draft.agreed <= len(draft.tokens)
        assert not draft.contested or draft.agreed < len(draft.tokens)


def test_where_its_own_text_has_no_match_a_draft_is_borrowed_from_recent_texts() -> None:
    recent = RecentTexts(2)
    recent.add([50, 51, 52, 53, 54])
    recent.add([60, 51, 52, 55])
    h = history([1, 2, 3, 4], [9, 51, 52], n=2)
    assert h.draft(limit=3) is None  # nothing of its own
    draft = h.draft(limit=3, recent=recent)
    # the most recent text wins a tie of match lengths; a text is not extended
    assert draft is not None and draft.borrowed and draft.match == 2 and draft.tokens == [55]
    assert draft.agreed == 0 and not draft.contested  # other documents' texts do not agree
    assert draft.cut(1).borrowed
    # the longest match wins among them
    recent.add([9, 51, 52, 70, 71, 72, 73])
    longest = h.draft(limit=3, recent=recent)
    assert longest is not None and longest.match == 3 and longest.tokens == [70, 71, 72]
    # any match in its own prompt or text comes first, however long the borrowed one
    own = history([1, 51, 52, 80], [9, 51, 52], n=2)
    found = own.draft(limit=3, recent=recent)
    assert found is not None and not found.borrowed and found.tokens == [80, 9, 51]


def test_recent_texts_keep_at_most_their_capacity_the_newest_first_to_stay() -> None:
    recent = RecentTexts(2, capacity=20)
    recent.add([7])  # too short to hold an n-gram with a token after it
    assert len(recent) == 0
    texts = [[100 * i + j for j in range(6)] for i in range(1, 6)]
    for text in texts:
        recent.add(text)
        assert len(recent) <= 20
        assert recent.occurrences((text[0], text[1])) == [(text, 2)]
        assert not recent.occurrences((text[-2], text[-1]))  # nothing after it
    # past 20 tokens the older half went: the first texts draft nothing any more
    assert not recent.occurrences((texts[0][0], texts[0][1]))
    assert recent.occurrences((texts[-2][0], texts[-2][1]))
    long = list(range(1000, 1050))
    recent.add(long)  # longer than it holds: its last 20 tokens
    assert len(recent) == 20 and recent.occurrences((1030, 1031)) == [(long[30:], 2)]


@given(
    text=st.lists(st.integers(0, 3), max_size=20),
    others=st.lists(st.lists(st.integers(0, 3), max_size=20), max_size=3),
    limit=st.integers(1, 6),
)
def test_a_borrowed_draft_continues_a_match_in_a_recent_text(
    text: list[int], others: list[list[int]], limit: int
) -> None:
    recent = RecentTexts(2)
    for other in others:
        recent.add(other)
    h = history([], text, n=2)
    draft = h.draft(limit, recent)
    if draft is None or not draft.borrowed:
        return
    assert h.draft(limit) is None  # borrowed only where its own text has nothing
    suffix = text[len(text) - draft.match :]
    assert 1 <= len(draft.tokens) <= limit
    assert any(
        other[at - draft.match : at] == suffix
        and other[at : at + len(draft.tokens)] == draft.tokens
        for other in others
        for at in range(draft.match, len(other))
    )


def test_borrowed_drafts_are_learned_apart_from_the_requests_own() -> None:
    a = Acceptance(ngram_max=8)
    # another document's answer is worth less than the request's own text, however long
    assert a.rate(8, 0, 0, borrowed=True) == pytest.approx(BORROWED_START)
    assert a.rate(3, 0, 0) > BORROWED_START
    record = DraftRecord()
    for _ in range(100):
        a.record(8, drafted=8, accepted=0, borrowed=True)
        record.add(8, drafted=8, accepted=0, borrowed=True)
    assert a.rate(8, 0, 0, borrowed=True) < 0.05
    assert a.rate(8, 0, 0) == pytest.approx(Acceptance.start(8, greedy=False))
    assert record.of(8, borrowed=True) == (0, 100) and record.of(8) == (0, 0)


def test_acceptance_starts_hopeful_for_long_matches_learns_and_weighs_the_sequence() -> None:
    a = Acceptance(ngram_max=8)
    # hopeful where the context is being copied, so that drafts are tried and measured
    assert a.rate(0, 0, 0) == pytest.approx(0.5) and a.rate(8, 0, 0) == pytest.approx(0.94)
    assert a.rate(2, 0, 0) < a.rate(3, 0, 0) < a.rate(8, 0, 0)
    # greedy text copies a long match more faithfully than sampled text
    assert Acceptance.start(8, greedy=True) > Acceptance.start(8, greedy=False)
    assert Acceptance.start(64, greedy=True) == Acceptance.start(8, greedy=True)
    for _ in range(200):
        a.record(3, drafted=8, accepted=0)  # short matches: always wrong
        a.record(8, drafted=8, accepted=8)  # long matches: always right
    assert a.rate(3, 0, 0) < 0.05
    assert a.rate(8, 0, 0) > 0.95
    # a sequence whose own drafts were all accepted pulls a poor prior up
    assert a.rate(3, accepted=40, tried=40) > 0.85
    assert a.rate(3, 0, 0) >= Acceptance.FLOOR


def test_a_sequences_misses_on_short_matches_leave_its_long_ones_drafted() -> None:
    # a sequence whose drafts from 3-token matches all missed still copies long spans: its
    # record is kept by match length, so a match of 8 is drafted whole as for a new one
    fixed = StepCost.fixed(STEEP_ROW_COST)
    a = Acceptance(ngram_max=8)
    record = DraftRecord()
    for _ in range(10):
        record.add(3, drafted=3, accepted=0)
    record.add(8, drafted=15, accepted=15)
    assert record.of(3) == (0, 10) and record.of(8) == (15, 15) and record.of(5) == (0, 0)

    def plan(match: int) -> list[int]:
        rate = a.own_rate(match, *record.of(match), greedy=True)
        return plan_drafts([Candidate(length=15, rate=rate)], generating=1, decode_rows=1,
                           prompt_rows=0, batch_rows=65, cost=fixed,
                           sample_seconds=0.0)  # fmt: skip

    assert plan(3) == [0]
    assert plan(8) == [15]
    # pooled, the same record would have cut the long draft short
    pooled = a.own_rate(8, 0 + 15, 10 + 15, greedy=True)
    assert plan_drafts([Candidate(length=15, rate=pooled)], generating=1, decode_rows=1,
                       prompt_rows=0, batch_rows=65, cost=fixed,
                       sample_seconds=0.0)[0] < 15  # fmt: skip


def test_compared_counts_accepted_tokens_and_the_first_miss() -> None:
    assert compared(drafted=5, accepted=2) == 3
    assert compared(drafted=5, accepted=5) == 5
    assert compared(drafted=4, accepted=0) == 1


def test_step_cost_interpolates_extrapolates_and_follows_measurements() -> None:
    c = StepCost()
    assert not c.known()
    c.set(1, 0.010)
    assert c.estimate(4) == pytest.approx(0.040)  # one point: proportional
    c.set(2, 0.012)
    c.set(8, 0.030)
    assert c.estimate(1) == pytest.approx(0.010)
    assert c.estimate(5) == pytest.approx(0.012 + 3 * 0.018 / 6)
    assert c.estimate(16) == pytest.approx(0.030 + 8 * 0.018 / 6)
    for _ in range(50):
        c.observe(8, 0.050)
    assert c.estimate(8) == pytest.approx(0.050, rel=1e-3)


def test_steps_that_slow_down_move_the_row_counts_not_seen_since() -> None:
    # measured before serving on an empty cache; then only 16-row steps, all 1.5x slower
    c = StepCost()
    for rows, ms in ((1, 14.7), (8, 52.6), (16, 78.3), (32, 137.2)):
        c.set(rows, ms / 1000)
    slope_before = (c.estimate(32) - c.estimate(16)) / 16
    for _ in range(100):
        c.observe(16, 0.1175)
    assert c.estimate(16) == pytest.approx(0.1175, rel=1e-3)
    # rows beyond 16 still cost what they did per row, scaled: drafts do not look free
    slope_after = (c.estimate(32) - c.estimate(16)) / 16
    assert slope_after > slope_before
    assert c.estimate(32) > 1.25 * 0.1372
    assert c.estimate(1) > 0.0147


def flat_then_linear(knee: int, base: float, per_row: float) -> StepCost:
    c = StepCost()
    for rows in (1, 2, 4, 8, 16, 32, 64):
        c.set(rows, base + per_row * max(rows - knee, 0))
    return c


def test_free_rows_are_drafted_when_acceptance_is_good() -> None:
    gpu = flat_then_linear(knee=64, base=0.020, per_row=0.001)
    take = plan_drafts(
        [Candidate(rate=0.6, length=8)], generating=1, decode_rows=1, prompt_rows=0,
        batch_rows=101, cost=gpu, sample_seconds=0.0,
    )
    assert take == [8]


def test_costly_rows_with_poor_acceptance_are_not_drafted() -> None:
    cpu = flat_then_linear(knee=1, base=0.020, per_row=0.004)  # each row +20%
    take = plan_drafts(
        [Candidate(rate=0.1, length=8)], generating=1, decode_rows=1, prompt_rows=0,
        batch_rows=101, cost=cpu, sample_seconds=0.0,
    )
    assert take == [0]


def test_a_saturated_batch_drafts_less_than_a_small_one() -> None:
    cost = flat_then_linear(knee=4, base=0.020, per_row=0.003)
    one = plan_drafts(
        [Candidate(0.7, 16)], generating=1, decode_rows=1, prompt_rows=0, batch_rows=501,
        cost=cost, sample_seconds=0.0,
    )
    many = plan_drafts(
        [Candidate(0.7, 16)] * 16, generating=16, decode_rows=16, prompt_rows=0,
        batch_rows=516, cost=cost, sample_seconds=0.0,
    )
    assert sum(one) > 0
    assert max(many) < one[0]


def test_rows_go_to_the_likelier_drafts_first_and_respect_free_rows() -> None:
    gpu = flat_then_linear(knee=64, base=0.020, per_row=0.001)
    take = plan_drafts(
        [Candidate(0.2, 8), Candidate(0.9, 8)], generating=2, decode_rows=2, prompt_rows=0,
        batch_rows=8, cost=gpu, sample_seconds=0.0,
    )
    assert take == [0, 6]
    assert plan_drafts([Candidate(0.9, 8)], generating=1, decode_rows=1, prompt_rows=0,
                       batch_rows=1, cost=gpu, sample_seconds=0.0) == [0]
    assert plan_drafts([Candidate(0.9, 8)], generating=1, decode_rows=1, prompt_rows=8,
                       batch_rows=9, cost=gpu, sample_seconds=0.0) == [0]  # a prompt's rows
    # nothing measured yet
    assert plan_drafts([Candidate(0.9, 8)], generating=1, decode_rows=1, prompt_rows=0,
                       batch_rows=9, cost=StepCost(), sample_seconds=0.0) == [0]


def test_a_prompt_chunk_in_the_step_takes_rows_and_weighs_nothing() -> None:
    # costs measured at 16 in flight (Gemma 3 270M, 2 CPU cores): a 16-row step 81 ms, 32
    # rows 148: drafts of sampled text, accepted at about 0.75, do not pay there
    cost = StepCost()
    for rows, ms in ((1, 13.8), (8, 57.0), (16, 81.0), (32, 148.0), (64, 285.0)):
        cost.set(rows, ms / 1000)
    drafts = [Candidate(0.75, 4)] * 16

    def plan(prompt_rows: int) -> list[int]:
        return plan_drafts(drafts, generating=16, decode_rows=16, prompt_rows=prompt_rows,
                           batch_rows=512, cost=cost, sample_seconds=0.0)

    assert plan(0) == [0] * 16
    # a 220-token prompt joining makes the step slow, which does not make drafts cheaper
    assert plan(220) == plan(0)
    # and a prompt that fills the batch leaves no rows for them
    good = [Candidate(0.99, 4)] * 16
    assert sum(plan_drafts(good, generating=16, decode_rows=16, prompt_rows=0,
                           batch_rows=512, cost=cost, sample_seconds=0.0)) > 0
    assert plan_drafts(good, generating=16, decode_rows=16, prompt_rows=496, batch_rows=512,
                       cost=cost, sample_seconds=0.0) == [0] * 16


SPLIT = BatchShape(split=True, n_ubatch=512)
UNIFIED = BatchShape(split=False, n_ubatch=512)


def test_a_stream_per_slot_decodes_a_longer_sequence_in_passes_of_its_own() -> None:
    ones = [(slot, 1) for slot in range(8)]
    assert SPLIT.passes(ones) == [8]
    assert SPLIT.passes([*ones[:3], (3, 5), *ones[4:]]) == [8, 4]
    # two drafts apart: a pass for each; two alike on neighbouring slots share one
    apart = [(s, 5 if s in (2, 5) else 1) for s in range(8)]
    assert SPLIT.passes(apart) == [8, 4, 4]
    together = [(s, 5 if s in (2, 3) else 1) for s in range(8)]
    assert SPLIT.passes(together) == [8, 8]
    # a draft on every slot, all alike: one pass
    assert SPLIT.passes([(s, 3) for s in range(8)]) == [24]
    # slots that are not consecutive are not decoded together
    assert SPLIT.passes([(0, 1), (1, 1), (5, 1)]) == [2, 1]
    # one unified stream: rows in runs of n_ubatch, whatever their slots
    assert UNIFIED.passes(apart) == [16]
    assert BatchShape(split=False, n_ubatch=8).passes(apart) == [8, 8]


@given(
    rows=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    n_ubatch=st.integers(16, 64),
    split=st.booleans(),
)
def test_passes_hold_every_row_once_and_fit_the_ubatch(
    rows: list[int], n_ubatch: int, split: bool
) -> None:
    passes = BatchShape(split=split, n_ubatch=n_ubatch).passes(list(enumerate(rows)))
    assert sum(passes) == sum(rows)
    assert all(0 < p <= n_ubatch for p in passes)
    if not split:
        assert len(passes) == -(-sum(rows) // n_ubatch)
    elif any(rows):
        # never fewer passes than the longest sequence needs, one row per pass
        assert len(passes) >= -(-max(rows) // n_ubatch)


@given(
    rows=st.lists(st.integers(0, 12), min_size=1, max_size=10),
    gaps=st.lists(st.integers(1, 3), min_size=10, max_size=10),
    n_ubatch=st.integers(1, 24),
    split=st.booleans(),
    limit=st.integers(1, 60),
)
def test_priced_passes_are_the_listed_passes_priced(
    rows: list[int], gaps: list[int], n_ubatch: int, split: bool, limit: int
) -> None:
    # slots with gaps between some of them, small ubatches that chunk a run's rows, runs
    # cut at n_ubatch slots: what the planner prices is what `passes` lists
    slots = [sum(gaps[: i + 1]) for i in range(len(rows))]
    shape = BatchShape(split=split, n_ubatch=n_ubatch)
    price = [n * n + 0.5 * (n % 4) for n in range(limit + 1)]  # uneven, like a CPU's
    passes = shape.passes(list(zip(slots, rows, strict=True)))
    seconds = shape.seconds(slots, rows, price, limit)
    if passes and max(passes) > limit:
        assert seconds is None
    else:
        assert seconds == pytest.approx(sum(price[n] for n in passes))


def test_prices_follow_the_curve_and_start_over_when_it_changes() -> None:
    cost = StepCost()
    cost.set(1, 0.010)
    cost.set(4, 0.040)
    assert cost.prices(6) == pytest.approx([0.0, 0.010, 0.020, 0.030, 0.040, 0.050, 0.060])
    cost.set(2, 0.030)
    assert cost.prices(2) == pytest.approx([0.0, 0.010, 0.030])


# Gemma 3 270M on 2 Zen 4 cores, the engine's calibration in ms by rows (issue 31)
ZEN4 = {1: 15.7, 2: 30.9, 4: 38.1, 8: 58.2, 16: 79.9, 32: 123.3}


def zen4() -> StepCost:
    cost = StepCost()
    for rows, ms in ZEN4.items():
        cost.set(rows, ms / 1000)
    return cost


def test_at_8_in_flight_a_draft_pays_in_a_unified_cache_and_not_in_a_split_one() -> None:
    # a 4-token draft of a long match, accepted at 0.88 a token, beside 7 other sequences
    drafts = [Candidate(0.0, 0, slot) for slot in range(8)]
    drafts[3] = Candidate(0.88, 4, 3)
    fed = [(slot, 1) for slot in range(8)]

    def plan(shape: BatchShape | None) -> list[int]:
        return plan_drafts(drafts, generating=8, decode_rows=8, prompt_rows=0, batch_rows=512,
                           cost=zen4(), sample_seconds=0.0, shape=shape, fed=fed)

    assert plan(None) == plan(UNIFIED) == [0, 0, 0, 4, 0, 0, 0, 0]
    # split: the draft is a pass of its own, 38 ms more for about 3 tokens where the 8
    # decoding rows make 8 in 58 ms
    assert plan(SPLIT) == [0] * 8


def test_no_draft_makes_a_pass_larger_than_the_rows_measured() -> None:
    # 16 sequences copying their documents, on one stream: drafts of 15 each would make one
    # pass of 256 rows, and the curve was measured up to 32 rows only
    copying = [Candidate(0.99, 15, slot) for slot in range(16)]
    fed = [(slot, 1) for slot in range(16)]

    def rows(shape: BatchShape | None) -> int:
        take = plan_drafts(copying, generating=16, decode_rows=16, prompt_rows=0,
                           batch_rows=512, cost=zen4(), sample_seconds=0.0, shape=shape,
                           fed=fed)  # fmt: skip
        return 16 + sum(take)

    assert rows(None) == rows(UNIFIED) == 32  # as many as were measured, and no more
    # a stream per slot: the drafts of neighbouring slots share a pass, which stays within
    # the 32 rows measured too
    assert 16 < rows(SPLIT) <= 32
    # once more rows are measured, more are drafted
    wider = zen4()
    wider.set(64, 0.190)
    assert sum(plan_drafts(copying, generating=16, decode_rows=16, prompt_rows=0,
                           batch_rows=512, cost=wider, sample_seconds=0.0, shape=UNIFIED,
                           fed=fed)) > 16  # fmt: skip


def test_split_drafts_that_share_a_pass_can_still_pay() -> None:
    # every sequence copies its document: one pass of 8 x (1 + k) rows
    drafts = [Candidate(0.99, 3, slot) for slot in range(8)]
    take = plan_drafts(drafts, generating=8, decode_rows=8, prompt_rows=0, batch_rows=512,
                       cost=zen4(), sample_seconds=0.0, shape=SPLIT,
                       fed=[(slot, 1) for slot in range(8)])
    assert sum(take) > 0


@given(
    rate=st.floats(0.05, 0.99), length=st.integers(1, 16), rows=st.integers(1, 3),
    split=st.booleans(),
)
def test_one_sequence_alone_is_planned_the_same_whatever_the_shape(
    rate: float, length: int, rows: int, split: bool
) -> None:
    # a repeatable request alone is planned from itself: the cache layout changes nothing
    shape = BatchShape(split=split, n_ubatch=512)
    args = dict(generating=1, decode_rows=rows, prompt_rows=0, batch_rows=512,
                cost=StepCost.fixed(STEEP_ROW_COST), sample_seconds=0.0)
    alone = plan_drafts([Candidate(rate, length, 0)], **args)  # type: ignore[arg-type]
    shaped = plan_drafts([Candidate(rate, length, 0)], shape=shape, fed=[(0, rows)],
                         **args)  # type: ignore[arg-type]
    assert alone == shaped


def test_settings_name_every_problem() -> None:
    assert SpeculationSettings().problems() == []
    problems = SpeculationSettings(mode="on", draft_max=0, ngram_min=5, ngram_max=4).problems()
    assert len(problems) == 3
    assert "speculation" in problems[0]
    assert "spec_draft_max" in problems[1] and "spec_ngram_max" in problems[2]
    assert not SpeculationSettings(mode="off").enabled


def test_a_long_match_is_drafted_where_a_second_row_costs_a_whole_step() -> None:
    # step costs measured on a CPU whose 1-row decode has a kernel of its own (Gemma 3 270M,
    # AVX-512 without AMX): a new engine drafts on a long match there, not on a short one,
    # and stops once its drafts miss
    cost = StepCost()
    for rows, ms in ((1, 13.6), (2, 30.3), (3, 38.6), (5, 64.0), (9, 77.2), (17, 107.9)):
        cost.set(rows, ms / 1000)
    a = Acceptance(ngram_max=8)

    def plan(match: int) -> list[int]:
        candidate = Candidate(length=16, rate=a.rate(match, 0, 0))
        return plan_drafts([candidate], generating=1, decode_rows=1, prompt_rows=0,
                           batch_rows=65, cost=cost, sample_seconds=0.0)  # fmt: skip

    assert plan(8)[0] >= 8
    assert plan(2) == [0]
    for _ in range(20):
        a.record(8, drafted=16, accepted=1)
    assert plan(8) == [0]


def test_a_plan_from_the_request_alone_ignores_what_the_engine_learned() -> None:
    a = Acceptance(ngram_max=8)
    fixed = StepCost.fixed(STEEP_ROW_COST)
    assert fixed.estimate(1) == 1.0 and fixed.estimate(17) == STEEP_ROW_COST[17]

    def plan(rate: float) -> list[int]:
        return plan_drafts([Candidate(length=16, rate=rate)], generating=1, decode_rows=1,
                           prompt_rows=0, batch_rows=65, cost=fixed,
                           sample_seconds=0.0)  # fmt: skip

    before = [plan(a.own_rate(m, 0, 0, greedy=False)) for m in range(9)]
    for _ in range(400):  # other requests: every draft accepted, whatever its match
        for m in range(9):
            a.record(m, drafted=16, accepted=16)
    assert a.rate(2, 0, 0) > 0.95  # the live estimate follows them
    assert [plan(a.own_rate(m, 0, 0, greedy=False)) for m in range(9)] == before
    assert before[8][0] >= 8 and before[2] == [0]  # even where rows cost the most: long ones
    # the request's own record still decides: its drafts miss, it stops drafting
    assert plan(a.own_rate(8, accepted=2, tried=40, greedy=False)) == [0]


# A CPU's step time by rows with steps in it, in multiples of the 1-row step (Gemma 3 270M,
# AMD EPYC with AVX-512, 2 threads, `python -m bench.verify_cost`, an earlier run than the
# engine's own table, which did not time 10, 11, 14 and 15 rows): the kernels take rows in
# blocks of four, so 4 rows cost little more than 3, and 8 rows less than 7.
STEPPED = {1: 1.0, 2: 1.90, 3: 2.35, 4: 2.48, 5: 3.80, 6: 4.17, 7: 4.69, 8: 4.09, 9: 5.08,
           12: 4.94, 13: 6.18, 16: 6.06, 17: 7.60}


def one_draft(cost: StepCost, rate: float, length: int = 16) -> int:
    return plan_drafts([Candidate(rate, length)], generating=1, decode_rows=1, prompt_rows=0,
                       batch_rows=65, cost=cost, sample_seconds=0.0)[0]


def test_the_draft_ends_where_a_block_of_rows_is_full() -> None:
    stepped = StepCost.fixed(STEPPED)
    for rate in (0.6, 0.8, 0.9, 0.95, 0.99):
        k = one_draft(stepped, rate)
        assert k == 0 or (1 + k) % 4 == 0, (rate, k)
    # nearly sure drafts take the whole block of 16 rows, not the 17th that starts a new one
    assert one_draft(stepped, 0.99) == 15
    # a draft of one token, where a second row nearly doubles the step, is bought only when
    # it is almost sure; three tokens on the same odds fill the block and pay
    assert one_draft(stepped, 0.85, length=1) == 0
    assert one_draft(stepped, 0.85, length=3) == 3
    # the same curve drawn through powers of two alone misses the steps: 5 to 7 rows look
    # cheaper than they are, so the plan lands off a block
    smooth = StepCost.fixed({rows: STEPPED[rows] for rows in (1, 2, 4, 8, 16)})
    assert any((1 + one_draft(smooth, rate, length)) % 4 for rate in (0.6, 0.7, 0.8)
               for length in (5, 6, 7))


def test_a_flat_curve_drafts_whole_drafts() -> None:
    # a GPU at low concurrency: a step of 17 rows costs what one of 1 does
    flat = StepCost.fixed({rows: 1.0 for rows in (1, 2, 4, 8, 16, 32)})
    assert one_draft(flat, 0.5) == 16
    assert one_draft(flat, 0.3) == 16  # free rows: any expected token pays
    assert one_draft(flat, 0.5, length=3) == 3


def test_agreed_tokens_are_drafted_up_to_where_the_occurrences_part() -> None:
    stepped = StepCost.fixed(STEPPED)

    def plan(rate: float, length: int = 8, **agreement: int | bool) -> int:
        candidate = Candidate(rate, length, agreed_rate=AGREED_ACCEPTANCE[0], **agreement)  # type: ignore[arg-type]
        return plan_drafts([candidate], generating=1, decode_rows=1, prompt_rows=0,
                           batch_rows=65, cost=stepped, sample_seconds=0.0)[0]  # fmt: skip

    short_match = Acceptance.start(2, greedy=True)
    assert plan(short_match) == 0  # where rows are dear, a short match alone is not bought
    # the line's other occurrences agree on 3 tokens and part at the 4th (a counter): the
    # agreed tokens fill the block of 4 rows, and the contested one starts no new block
    assert plan(short_match, agreed=3, contested=True) == 3
    assert plan(short_match, agreed=7, contested=False) == 7
    # a long match's own rate is not lowered by the floor for agreed tokens
    long_match = Acceptance.start(8, greedy=True)
    assert plan(long_match, length=16) == plan(long_match, length=16, agreed=2) == 15
    # past agreed tokens, a contested one weighs less than the same one uncontested
    assert plan(0.9, agreed=3, contested=True) < plan(0.9, agreed=3, contested=False)
    # where rows are nearly free, a contested draft is still drafted whole
    flat = StepCost.fixed({rows: 1.0 for rows in (1, 2, 4, 8, 16, 32)})
    candidate = Candidate(short_match, 8, agreed=1, agreed_rate=0.97, contested=True)
    assert plan_drafts([candidate], generating=1, decode_rows=1, prompt_rows=0,
                       batch_rows=65, cost=flat, sample_seconds=0.0) == [8]  # fmt: skip


def test_a_lift_asks_a_drafts_rows_to_buy_tokens_as_fast_as_drafting_keeps() -> None:
    stepped = StepCost.fixed(STEEP_ROW_COST)
    flat = StepCost.fixed({rows: 1.0 for rows in (1, 2, 4, 8, 16, 32)})

    def plan(candidate: Candidate, lift: float | None, cost: StepCost = stepped) -> int:
        return plan_drafts([candidate], generating=1, decode_rows=1, prompt_rows=0,
                           batch_rows=65, cost=cost, sample_seconds=0.0, lift=lift)[0]  # fmt: skip

    # one agreed token, then a counter: 1.97 expected tokens for a step of 1.86 raise that
    # step's own rate, but its second row buys 0.97 tokens for 0.86 of a step, slower than
    # the text is expected to go on
    one = Candidate(Acceptance.start(2, greedy=True), 8, agreed=1,
                    agreed_rate=AGREED_ACCEPTANCE[0], contested=True)  # fmt: skip
    assert plan(one, None) == 1
    assert plan(one, KEPT_LIFT) == 0
    # a fair draft is left to later steps, a nearly sure one fills a larger block
    assert plan(Candidate(0.8, 16), None) == 3
    assert plan(Candidate(0.8, 16), KEPT_LIFT) == 0
    assert plan(Candidate(0.95, 16), None) == 11
    assert plan(Candidate(0.95, 16), KEPT_LIFT) == 15
    # nearly free rows pay at any rate the text keeps: whole drafts, as without a lift
    assert plan(Candidate(0.5, 16), KEPT_LIFT, flat) == 16


def test_a_candidates_chances_follow_its_agreement() -> None:
    c = Candidate(0.5, 6, agreed=2, agreed_rate=0.97, contested=True)
    assert list(c.chances()) == [0.97, 0.97, 0.5 * CONTESTED, 0.5, 0.5, 0.5]
    assert list(Candidate(0.99, 3, agreed=3, agreed_rate=0.97).chances()) == [0.99] * 3
    assert list(Candidate(0.6, 2).chances()) == [0.6, 0.6]


def test_every_row_count_of_a_draft_is_timed_before_serving() -> None:
    assert calibration_rows(16, 512) == [*range(1, 18), 24, 32]
    assert calibration_rows(4, 512) == [1, 2, 3, 4, 5, 24, 32]
    assert calibration_rows(16, 8) == list(range(1, 9))  # no batch holds more logits
    assert calibration_rows(64, 512) == list(range(1, 33))
