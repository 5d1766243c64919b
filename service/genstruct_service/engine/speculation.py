"""Grounded speculation: drafts from the document a sequence quotes, and when to verify them.

A Genstruct answer restates its document. When the last tokens a sequence generated also
occur in its prompt (or earlier in its own output), the tokens that followed them there are
a likely continuation: a *draft* (engine/ngrams.py). The engine decodes the draft with the
sequence's last token in one step, with logits at every position, and keeps the drafted
tokens its sampler picks itself (engine/verify.py). Each accepted token is a decode step saved.

Verifying costs batch rows. On a GPU at low concurrency they are nearly free; on a few CPU
cores that already decode many sequences they are not. So each step is planned: the
engine's measured step time by batch rows (`StepCost`, engine/step_cost.py) and each
draft's expected accepted tokens (`Acceptance`) decide how many rows, if any, go to drafts
(`plan_drafts`).

A row verified in another batch shape can compute logits a hair apart and so change a
token, and a live plan follows whatever the engine measured and learned before. So a
request whose text must repeat (greedy, or sampled with a seed), when it runs alone, is
planned from itself: its own record against a start fixed per match length, and a fixed
cost shape instead of the measured one: a GPU's (`GPU_ROW_COST`) where every layer is on
one, else the CPU's where rows cost most (`STEEP_ROW_COST`). The same request run alone
then drafts the same rows, and writes the same text, on every run and after every restart
with the same model, hardware and settings.
Alongside other requests its batches depend on theirs anyway: the live plan applies to a
greedy request, and under auto a seeded sampled one is not drafted there (engine/drafts.py).

This module holds the settings, the acceptance estimate and the planner: pure Python,
tested without a model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from genstruct_service.engine.step_cost import BatchShape, StepCost

MODES = ("auto", "always", "off")
DRAFT_LIMIT = 64  # the most spec_draft_max may be
NGRAM_MIN_LIMIT = 16
NGRAM_MAX_LIMIT = 64


@dataclass(frozen=True, slots=True)
class SpeculationSettings:
    """When to draft, and its limits.

    `auto` drafts where the plan says it pays, `always` wherever a match gives a draft (as
    llama-server does), `off` decodes one token per sequence per step.
    """

    mode: str = "auto"
    draft_max: int = 16  # drafted tokens per sequence per step
    ngram_min: int = 2  # the shortest suffix match that proposes a draft
    ngram_max: int = 8  # matches are measured up to this length (longer counts as this)

    def problems(self) -> list[str]:
        """What is wrong with these limits, one sentence each (empty when they are valid)."""
        found = []
        if self.mode not in MODES:
            found.append(f"speculation must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= self.draft_max <= DRAFT_LIMIT:
            found.append(
                f"spec_draft_max must be between 1 and {DRAFT_LIMIT}, got {self.draft_max}"
            )
        if not 1 <= self.ngram_min <= NGRAM_MIN_LIMIT:
            found.append(
                f"spec_ngram_min must be between 1 and {NGRAM_MIN_LIMIT}, got {self.ngram_min}"
            )
        if not self.ngram_min <= self.ngram_max <= NGRAM_MAX_LIMIT:
            found.append(
                f"spec_ngram_max must be between spec_ngram_min ({self.ngram_min}) and "
                f"{NGRAM_MAX_LIMIT}, got {self.ngram_max}"
            )
        return found

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

# The chance that a drafted token is accepted after the one before it was, by the length of
# the match its draft came from (index: match length, capped at 8), before anything is
# learned. Measured with every match drafted (speculation `always`, 16 tokens at most) on 16
# documents the planner was never tuned on: `python -m bench.speculation --engine-modes
# always --server-specs "" --levels 1 --docs 16 --max-tokens 128 --documents
# bench/heldout.jsonl [--sampled]`, Gemma 3 270M Q4_K_M. Matches of 4 to 7 tokens are
# pooled (each had a few dozen compared tokens). A match of 8 copies its document: greedy
# text took 761 of 762 such drafted tokens. Sampled is temperature 0.7, top-k 40, top-p 0.95,
# min-p 0.05.
GREEDY_ACCEPTANCE = (0.5, 0.5, 0.56, 0.79, 0.88, 0.88, 0.88, 0.88, 0.99)
SAMPLED_ACCEPTANCE = (0.5, 0.5, 0.58, 0.75, 0.87, 0.87, 0.87, 0.87, 0.94)

# Where the suffix n-gram a draft came from occurs more than once, its other occurrences
# tell which tokens are likely (`Draft.agreed`, engine/ngrams.py). A token they all go on
# with is accepted at least this often (greedy, sampled), whatever the match: on the
# replayed texts of the 16 documents of bench/heldout.jsonl (all 128 tokens, Gemma 3 270M
# Q4_K_M), greedy text took 100% of such tokens (950 drafts) and 97% after matches of 2
# tokens (50), sampled text 98% (443) and 86% after matches of 2 (32). The tables take the
# shortest matches' rates, where a draft's estimate is lowest and this floor weighs most.
AGREED_ACCEPTANCE = (0.97, 0.86)
# At the token where an occurrence goes on otherwise, a draft's chance is its rate times
# this; after it, as before. The same texts took that token 51% of the time greedy, 70%
# sampled, and 92% of the tokens after it. Replayed at 1 in flight on the heldout texts, 0.3
# decoded fastest of 0.3, 0.5 and 0.7 (4.1% below the planner without agreement against
# 3.3% and 2.3%): where rows are dear a short draft that stops before it beats a long one.
CONTESTED = 0.3

# The chance that a token of a draft borrowed from another request's text is accepted,
# given the one before it was, before anything is learned, whatever the match. Borrowed
# drafts take less than the request's own: replayed on the engine's greedy texts (Gemma 3
# 270M Q4_K_M, 128 tokens each), borrowing from the documents before, they kept 52% of
# their tokens on bench/unseen.jsonl and 24% on bench/heldout.jsonl, and live sampled
# unseeded text (2 cores of an AMD EPYC) took 2 of 20 compared tokens when they started
# from SAMPLED_ACCEPTANCE. With `python -m bench.draft_replay --borrow`, priced on the H200
# curve of the Genstruct-7B-shaped model, 0.6 to 0.8 decoded within 1% of each other (unseen
# 2.72x plain decoding, heldout 2.97x) where 0.5 left most of them undrafted (unseen 1.97x);
# on this AMD EPYC's curve none is tried up to 0.8, and from 0.9 they cost time (1.22x
# against 1.23x).
BORROWED_START = 0.6

# A request alone is planned to keep this many times the rate of decoding one token a step
# (`plan_drafts`' `lift`): about what drafting kept over the texts it was planned on.
# Replayed on the engine's greedy texts of bench/heldout.jsonl (Gemma 3 270M Q4_K_M, 128
# tokens each), planned against `STEEP_ROW_COST` and priced on five step-time curves timed
# on 2 cores of an AMD EPYC, 2 rows at 1.86 to 2.27 times 1, the plans' decode time fell by
# 0.2 to 2.7% against plans that make each step's own rate highest; 1.2 and 1.3 did about
# as well. On the 12 documents of bench/unseen.jsonl, left out of the choice, it moved by
# +0.1 to -3.6%. On another AMD EPYC whose 2 rows cost 2.2 times 1, priced on its own
# curve: -3.1% (heldout) and -3.8% (unseen), with 1.2 to 1.6 within 0.5% of each other.
KEPT_LIFT = 1.4


class Acceptance:
    """The chance that a drafted token is accepted, given the one before it was.

    Starts from what grounded text does (the tables above: a long match copies its
    document and is accepted nearly whole), since a draft is the only way to measure its
    rate. Then it is learned per match length over the engine's life (decaying, so it
    follows the workload), and per sequence and match length (`DraftRecord`): a
    sequence's own record counts more as it grows. A repeatable request run alone is
    planned from the start and its own record only (`own_rate`), never from what other
    requests taught the engine.
    """

    _DECAY = 0.995  # per recorded draft
    _PRIOR = 4.0  # a sequence's record weighs this many tokens of the prior
    _START_WEIGHT = 2.0  # the start weighs this many compared tokens
    FLOOR = 0.02  # never quite zero, so a draft that costs nothing is still tried

    def __init__(self, ngram_max: int) -> None:
        # per match length: [accepted, compared]; the live estimate mixes greedy and sampled
        # requests, so it starts from the sampled table, the lower of the two. Drafts
        # borrowed from other requests' texts (engine/ngrams.py) are learned apart, from
        # BORROWED_START: a match in another document's answer is worth less.
        weight = self._START_WEIGHT
        self._by_match = [
            [weight * self.start(m, greedy=False), weight] for m in range(ngram_max + 1)
        ]
        self._borrowed = [[weight * BORROWED_START, weight] for _ in range(ngram_max + 1)]

    @staticmethod
    def start(match: int, *, greedy: bool) -> float:
        """The estimate before anything is learned, for a `match`-long match."""
        table = GREEDY_ACCEPTANCE if greedy else SAMPLED_ACCEPTANCE
        return table[min(match, len(table) - 1)]

    def rate(self, match: int, accepted: int, tried: int, *, borrowed: bool = False) -> float:
        """The estimate for a draft from a `match`-long match, for a sequence whose drafts
        from such matches so far had `accepted` of `tried` compared tokens accepted."""
        acc, seen = (self._borrowed if borrowed else self._by_match)[match]
        return self._shrunk(acc / seen, accepted, tried)

    def own_rate(self, match: int, accepted: int, tried: int, *, greedy: bool) -> float:
        """As `rate`, from the sequence's own record and the start alone: nothing learned
        from other requests moves it."""
        return self._shrunk(self.start(match, greedy=greedy), accepted, tried)

    def _shrunk(self, prior: float, accepted: int, tried: int) -> float:
        rate = (accepted + self._PRIOR * prior) / (tried + self._PRIOR)
        return max(rate, self.FLOOR)

    def record(self, match: int, drafted: int, accepted: int, *, borrowed: bool = False) -> None:
        stats = (self._borrowed if borrowed else self._by_match)[match]
        stats[0] = stats[0] * self._DECAY + accepted
        stats[1] = stats[1] * self._DECAY + compared(drafted, accepted)


class DraftRecord:
    """One sequence's drafts so far, by the length of the match each came from: tokens
    accepted and tokens compared.

    Kept per match length, since a sequence that misses on short matches (a word that
    recurs) still copies a long one nearly whole: pooled, its short misses dragged the
    estimate for a copied span down to where drafts of 2 or 3 tokens looked best (Gemma 3
    270M, greedy, AMD EPYC: 221 of 265 drafts were that short, while a match of 8 kept 93%
    of 15 drafted tokens).
    """

    __slots__ = ("_accepted", "_compared")

    def __init__(self) -> None:
        # by (match length, borrowed from another request's text)
        self._accepted: dict[tuple[int, bool], int] = {}
        self._compared: dict[tuple[int, bool], int] = {}

    def add(self, match: int, drafted: int, accepted: int, *, borrowed: bool = False) -> None:
        key = match, borrowed
        self._accepted[key] = self._accepted.get(key, 0) + accepted
        self._compared[key] = self._compared.get(key, 0) + compared(drafted, accepted)

    def of(self, match: int, *, borrowed: bool = False) -> tuple[int, int]:
        """(accepted, compared) of its drafts from `match`-long matches."""
        key = match, borrowed
        return self._accepted.get(key, 0), self._compared.get(key, 0)


def compared(drafted: int, accepted: int) -> int:
    """Drafted tokens the sampler was compared with: every accepted one and the first miss."""
    return accepted + 1 if accepted < drafted else accepted


@dataclass(frozen=True, slots=True)
class Candidate:
    """A sequence that could verify a draft this step."""

    rate: float  # Acceptance.rate for its draft
    length: int  # tokens in its draft
    slot: int = 0  # the slot it is fed on (the passes of a split KV cache follow slots)
    agreed: int = 0  # leading tokens the match's other occurrences agree on (Draft.agreed)
    agreed_rate: float = 0.0  # the least rate for those (AGREED_ACCEPTANCE)
    contested: bool = False  # another occurrence goes on otherwise at the token after them

    def chances(self) -> Iterator[float]:
        """The chance of each drafted token, given the one before it was accepted."""
        for j in range(self.length):
            if j < self.agreed:
                yield max(self.rate, self.agreed_rate)
            elif j == self.agreed and self.contested:
                yield self.rate * CONTESTED
            else:
                yield self.rate


def rows_left(decode_rows: int, prompt_rows: int, batch_rows: int) -> int:
    """The rows a step's batch has for drafts once its decode rows and prompt chunks fit."""
    return batch_rows - min(batch_rows, decode_rows + prompt_rows)


def plan_drafts(
    candidates: Sequence[Candidate],
    *,
    generating: int,
    decode_rows: int,
    prompt_rows: int,
    batch_rows: int,
    cost: StepCost,
    sample_seconds: float,
    shape: BatchShape | None = None,
    fed: Sequence[tuple[int, int]] = (),
    lift: float | None = None,
) -> list[int]:
    """How many drafted tokens each candidate verifies this step (0: none).

    Each extra row for a sequence whose draft already has j - 1 rows is worth the chance
    that all j drafted tokens are accepted (the product of `Candidate.chances`: rate^j
    where nothing else is known). Rows go to the best such gains first, and the step takes
    as many as maximise expected tokens per second: (generating + gain) / (step time +
    sampling time).
    `decode_rows` is the step's batch without drafts and prompt chunks, `prompt_rows` the
    prompt tokens waiting for it, `batch_rows` the most a batch holds.

    With a `lift`, the rate its sequences are expected to keep over their texts is `lift`
    times the step's rate without drafts, and the step takes the rows that maximise
    expected tokens minus that rate times its seconds instead: the least expected time to
    the end of a text that goes on at that rate. A draft's rows must then buy tokens at
    least that fast, not merely faster than this step decodes without them. One drafted
    token accepted 97% of the time, where 2 rows cost 1.86 times 1, makes its step's own
    rate 6% higher, but its row buys 0.97 tokens for 0.86 of a step, less than drafting
    keeps over the text; where 2 rows cost 2.2 times 1 it is a loss outright.

    A prompt chunk only takes rows; it is weighed as absent. Its rows are paid for whether
    drafts come or not, and yield no token: counted in, they make the step slow, so that
    any draft row looks cheap against its tokens per second. Measured with prompts of a few
    hundred tokens at 16 in flight, such drafts cost 6 ms a row where a token of plain
    decoding cost 4.4.

    With a `shape` and `fed`, the step's rows by slot without drafts (prompt chunks
    included), a draft costs at least the passes it adds (`BatchShape`): with a KV stream
    per slot, a draft beside other sequences is decoded in a pass of its own.

    No draft makes a pass larger than the largest row count measured (or than the step's
    own largest pass without drafts): past it the cost is extrapolated, and it grew faster
    than the line. At 16 in flight, 14 sequences drafting 9 tokens each made one pass of
    140 rows that took 626 ms against 438 extrapolated from 24 and 32 rows (Gemma 3 270M,
    AMD EPYC).
    """
    take = [0] * len(candidates)
    free_rows = rows_left(decode_rows, prompt_rows, batch_rows)
    if not candidates or free_rows <= 0 or not cost.known():
        return take
    gains: list[tuple[float, int]] = []
    for i, c in enumerate(candidates):
        g = 1.0
        for chance in c.chances():
            g *= chance
            gains.append((g, i))
    gains.sort(key=lambda item: -item[0])
    del gains[free_rows:]

    base = cost.estimate(decode_rows)
    passes = shape if len(fed) > 1 else None  # one slot fed: one pass, whatever the shape
    by_slot = dict(fed)  # the step's rows by slot without drafts, then with them
    without = passes.passes(sorted(by_slot.items())) if passes is not None else [decode_rows]
    widest = max(cost.largest(), *without)  # the largest pass a draft may make
    price = cost.prices(max(widest, decode_rows + len(gains)))
    if passes is not None:
        for c in candidates:
            by_slot.setdefault(c.slot, 0)
        slots = sorted(by_slot)
        rows = [by_slot[slot] for slot in slots]
        column = {slot: n for n, slot in enumerate(slots)}
        without_seconds = sum(price[n] for n in without)
    plain_seconds = base + sample_seconds * generating
    keep = None if lift is None else lift * generating / plain_seconds

    def worth(tokens: float, seconds: float) -> float:
        return tokens - keep * seconds if keep is not None else tokens / seconds

    best_k, best = 0, worth(generating, plain_seconds)
    gained = float(generating)
    for k, (g, i) in enumerate(gains, start=1):
        gained += g
        if passes is None:
            if decode_rows + k > widest:
                break
            step = price[decode_rows + k]
        else:
            rows[column[candidates[i].slot]] += 1
            seconds = passes.seconds(slots, rows, price, widest)
            if seconds is None:
                break
            step = max(price[decode_rows + k], base + seconds - without_seconds)
        value = worth(gained, step + sample_seconds * gained)
        if value > best:
            best_k, best = k, value
    for _, i in gains[:best_k]:
        take[i] += 1
    return take
