"""Which sequences verify a draft this step, and how many tokens of it: the engine's side of
grounded speculation (speculation.py holds the pure planner, ngrams.py the drafts themselves,
step_cost.py the cost model).

It keeps what the planner weighs: the step time by batch rows (measured before serving),
how llama.cpp cuts a batch into passes (`BatchShape`), and, learned as the engine runs, the
acceptance of drafts by match length and the sampling time per token; and what recent
generations wrote (`RecentTexts`), for drafts of requests whose text need not repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from functools import partial

from genstruct_service.engine.ngrams import Draft, RecentTexts
from genstruct_service.engine.request import Request, Status
from genstruct_service.engine.sequence import Sequence
from genstruct_service.engine.speculation import (
    AGREED_ACCEPTANCE,
    KEPT_LIFT,
    Acceptance,
    Candidate,
    SpeculationSettings,
    plan_drafts,
    rows_left,
)
from genstruct_service.engine.step_cost import (
    GPU_ROW_COST,
    STEEP_ROW_COST,
    BatchShape,
    StepCost,
)

DEAR_ROW = 1.5  # a step of 2 rows against 1, from which rows are dear


class DraftChooser:
    """Drafts for the step's sequences where verifying them pays."""

    def __init__(
        self, settings: SpeculationSettings, n_batch: int, shape: BatchShape | None = None,
        *, offloaded: bool = False,
    ) -> None:
        self.settings = settings
        self.n_batch = n_batch
        self.shape = shape  # how llama.cpp cuts a batch into passes; None: one pass
        self.cost = StepCost()  # measured before serving, refined by every step
        self.acceptance = Acceptance(settings.ngram_max)
        # a repeatable request run alone is planned against this, never against the measured:
        # the shape of where the model runs (every layer on a GPU, or not), fixed at start
        self.fixed_cost = StepCost.fixed(GPU_ROW_COST if offloaded else STEEP_ROW_COST)
        self.sample_seconds = 0.0  # moving average per sampled token
        self.recent = RecentTexts(settings.ngram_min)  # fed as generations end (update.py)

    def observe_sampling(self, seconds: float, tokens: int) -> None:
        self.sample_seconds += 0.2 * (seconds / tokens - self.sample_seconds)

    def choose(self, requests: Seq[Request], *, draining: bool = False) -> dict[Sequence, Draft]:
        """This step's drafts, by sequence (none for most steps of most sequences).

        A sequence drafts when it feeds one sampled token (not forced ones) and has at least
        two tokens of budget left; its draft never takes rows a prompt chunk needs. Where
        its own text and prompt have nothing to draft, a request whose text need not repeat
        (unseeded, or beside others) borrows from what recent generations wrote; one whose
        text must repeat, run alone, never does: what ran before would then decide its rows.

        `draining`: no request waits for a slot, so the sequences in flight are the last
        work there is, and the one with the most tokens left ends it. Where rows are dear
        (`rows_are_dear`: a CPU) and more than one request is in flight, only a sequence
        with the most budget left may then draft (`last_to_end`). A draft elsewhere makes
        every other sequence wait for its rows, the last one included, and moves its own
        sequence ahead to end alone, where the last ones would have shared their steps. On 2
        cores of an AMD EPYC, 12 documents at 8 in flight ended with 1 to 3 in flight for
        many steps (47 to 58 of them alone) where without drafts the last 4 ran together,
        and engine:auto was 0.90x engine:off (`bench.speculation`, paired median of 8
        rounds), 1.02x with this rule. A request alone plans its generations as before: for
        2 seeded sampled generations, drafting only the last one took 24.2 s for 6 documents
        against 22.0 s (medians of 3 interleaved runs). On a GPU a draft beside others costs
        them little.
        """
        spec = self.settings
        generating = rows = prefill = 0
        found: list[tuple[Sequence, Draft]] = []
        agreed_rate: dict[Sequence, float] = {}  # for its draft's agreed tokens
        fed: list[tuple[int, int]] = []  # (slot, rows) of the step without drafts
        alone = len(requests) == 1
        for request in requests:
            if request.status is not Status.GENERATING:
                prefill += request.prompt_left
                if request.status is Status.PREFILLING:
                    fed.append((request.seqs[0].slot, min(request.prompt_left, self.n_batch)))
                continue
            # a seeded sampled request beside others is not drafted: on the CPUs measured,
            # drafts of sampled text at 8 to 16 in flight saved nothing, and they would tie
            # its text to what else runs
            undrafted = spec.mode == "auto" and request.seeded_sampled and not alone
            recent = None if alone and request.repeatable else self.recent
            for seq in request.seqs:
                pending = seq.pending
                if seq.finish_reason is not None or not pending:
                    continue
                generating += 1
                rows += len(pending)
                fed.append((seq.slot, len(pending)))
                if len(pending) != 1 or seq.history is None or undrafted:
                    continue
                budget = seq.max_tokens - seq.n_generated - 1  # the last token is sampled
                draft = seq.history.draft(min(spec.draft_max, budget), recent)
                if draft is not None:
                    found.append((seq, draft))
                    agreed_rate[seq] = AGREED_ACCEPTANCE[0 if request.greedy else 1]
        if not found:
            return {}
        if spec.mode == "always":
            free = rows_left(rows, prefill, self.n_batch)
            chosen = {}
            for seq, draft in found:
                length = min(len(draft.tokens), max(free, 0))
                if length:
                    chosen[seq] = draft.cut(length)
                free -= length
            return chosen
        if alone and requests[0].repeatable:
            # alone, its batches are its own: plan them from the request alone, so that every
            # run of it drafts alike (speculation.py)
            greedy = not requests[0].seeded_sampled
            rate: Callable[[int, int, int], float] = partial(
                self.acceptance.own_rate, greedy=greedy
            )
            cost, sample_seconds = self.fixed_cost, 0.0
        else:
            rate, cost, sample_seconds = self.acceptance.rate, self.cost, self.sample_seconds
        if draining and generating > 1 and not alone and rows_are_dear(cost):
            found = last_to_end(found, requests)
        learned = self.acceptance

        def estimate(seq: Sequence, draft: Draft) -> float:
            if draft.borrowed:  # never for a repeatable request alone
                tried = seq.drafts.of(draft.match, borrowed=True)
                return learned.rate(draft.match, *tried, borrowed=True)
            return rate(draft.match, *seq.drafts.of(draft.match))

        take = plan_drafts(
            [
                Candidate(
                    estimate(s, d), len(d.tokens), s.slot,
                    agreed=d.agreed, agreed_rate=agreed_rate[s], contested=d.contested,
                )
                for s, d in found
            ],
            generating=generating, decode_rows=rows, prompt_rows=prefill,
            batch_rows=self.n_batch, cost=cost, sample_seconds=sample_seconds,
            shape=self.shape, fed=sorted(fed), lift=KEPT_LIFT if alone else None,
        )
        return {
            seq: draft.cut(k)
            for (seq, draft), k in zip(found, take, strict=True)
            if k
        }


def rows_are_dear(cost: StepCost) -> bool:
    """A second row costs at least half a step more (`DEAR_ROW`), as on a CPU: 0.8 to 0.9
    of a step on 2 cores of an AMD EPYC (`STEEP_ROW_COST`), little on a GPU."""
    return cost.known() and cost.estimate(2) >= DEAR_ROW * cost.estimate(1)


def last_to_end(
    found: list[tuple[Sequence, Draft]], requests: Seq[Request]
) -> list[tuple[Sequence, Draft]]:
    """The drafts of the sequences with the most tokens of budget left among all those
    generating: when nothing waits, the last to end."""
    most = max(
        seq.max_tokens - seq.n_generated
        for request in requests
        if request.status is Status.GENERATING
        for seq in request.seqs
        if seq.finish_reason is None and seq.pending
    )
    return [(seq, draft) for seq, draft in found if seq.max_tokens - seq.n_generated == most]
