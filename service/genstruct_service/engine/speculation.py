"""Grounded speculation: drafts from the document a sequence quotes, and when to verify them.

A Genstruct answer restates its document. When the last tokens a sequence generated also
occur in its prompt (or earlier in its own output), the tokens that followed them there are
a likely continuation: a *draft*. The engine decodes the draft with the sequence's last
token in one step, with logits at every position, and keeps the drafted tokens its sampler
picks itself (engine/verify.py). Each accepted token is a decode step saved.

Verifying costs batch rows. On a GPU at low concurrency they are nearly free; on a few CPU
cores that already decode many sequences they are not. So each step is planned: the
engine's measured step time by batch rows (`StepCost`) and each draft's expected accepted
tokens (`Acceptance`) decide how many rows, if any, go to drafts (`plan_drafts`).

A row verified in another batch shape can compute logits a hair apart and so change a
token, and a live plan follows whatever the engine measured and learned before. So a
request whose text must repeat (greedy, or sampled with a seed), when it runs alone, is
planned from itself: its own record against a start fixed per match length, and a fixed
cost shape (`STEEP_ROW_COST`) instead of the measured one. The same request run alone then
drafts the same rows, and writes the same text, on every run and after every restart.
Alongside other requests its batches depend on theirs anyway: the live plan applies to a
greedy request, and under auto a seeded sampled one is not drafted there (engine/drafts.py).

Everything here is pure Python over token ids, tested without a model.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


# A decode step's time by batch rows, in one-row steps, on the CPU where extra rows cost the
# most of those measured: Gemma 3 270M on 2 cores of an AMD EPYC (Zen 4, AVX-512), after a
# 384-token prompt, median of 9 (`python -m bench.verify_cost --drafts 0,1,...,16,23,31`).
# A second row nearly doubles the step, and the kernels take rows in blocks of four, so the
# curve has steps: 8 rows cost less than 5, 12 less than 9. Planned against it, a draft is
# verified only where it pays even there, and ends where a block is full; on a GPU it
# under-drafts, never over-drafts.
STEEP_ROW_COST = {
    1: 1.0, 2: 1.86, 3: 2.15, 4: 2.43, 5: 3.71, 6: 4.10, 7: 4.35, 8: 3.68, 9: 5.03,
    10: 5.46, 11: 5.65, 12: 4.79, 13: 6.14, 14: 6.34, 15: 6.70, 16: 5.97, 17: 7.14,
    24: 8.45, 32: 10.40,
}  # fmt: skip

# The most recent occurrences of an n-gram looked at when measuring a match: frequent
# n-grams ("of the") have many, and the most recent ones are the likeliest continuation.
_CANDIDATES = 8


class PromptNgrams:
    """Where each `n`-gram of a prompt occurs: n-gram -> the positions just after it.

    Built once per request, before it reaches the engine thread, and shared read-only by
    the request's generations.
    """

    __slots__ = ("n", "positions", "tokens")

    def __init__(self, tokens: Sequence[int], n: int) -> None:
        self.tokens = list(tokens)
        self.n = n
        positions: dict[tuple[int, ...], list[int]] = {}
        toks = self.tokens
        for end in range(n, len(toks) + 1):
            key = tuple(toks[end - n : end])
            found = positions.get(key)
            if found is None:
                positions[key] = [end]
            else:
                found.append(end)
        self.positions = positions


@dataclass(frozen=True, slots=True)
class Draft:
    tokens: list[int]
    match: int  # length of the suffix match it came from, capped at ngram_max


class History:
    """One sequence's tokens (its prompt, then what it generated) and drafts from them, and
    from what the other generations of its request wrote (`share`): generations of one
    document often restate the same spans."""

    __slots__ = ("_generated", "_max", "_n", "_own", "_peers", "_prompt", "_prompt_len")

    def __init__(self, prompt: PromptNgrams, ngram_max: int) -> None:
        self._prompt = prompt
        self._prompt_len = len(prompt.tokens)
        self._n = prompt.n
        self._max = ngram_max
        self._generated: list[int] = []
        # n-grams that end in the generated part (positions in prompt + generated)
        self._own: dict[tuple[int, ...], list[int]] = {}
        self._peers: tuple[History, ...] = ()

    @staticmethod
    def share(histories: Sequence[History]) -> None:
        """Let each of one request's generations draft from the others' text too."""
        for h in histories:
            h._peers = tuple(p for p in histories if p is not h)

    def __len__(self) -> int:
        return self._prompt_len + len(self._generated)

    def _at(self, i: int) -> int:
        p = self._prompt_len
        return self._prompt.tokens[i] if i < p else self._generated[i - p]

    def _slice(self, start: int, stop: int) -> list[int]:
        p = self._prompt_len
        if stop <= p:
            return self._prompt.tokens[start:stop]
        head = self._prompt.tokens[start:p] if start < p else []
        return head + self._generated[max(start - p, 0) : stop - p]

    def append(self, token: int) -> None:
        self._generated.append(token)
        end = len(self)
        n = self._n
        if end < n:
            return
        key = tuple(self._slice(end - n, end))
        found = self._own.get(key)
        if found is None:
            self._own[key] = [end]
        else:
            found.append(end)

    def draft(self, limit: int) -> Draft | None:
        """The tokens that followed the longest recent match of this sequence's suffix: in
        its own text, its prompt, then its peers' text (the first found wins a tie)."""
        n = self._n
        end = len(self)
        if limit < 1 or end <= n:
            return None
        key = tuple(self._slice(end - n, end))
        sources = [(self, self._own.get(key)), (self, self._prompt.positions.get(key))]
        sources += [(peer, peer._own.get(key)) for peer in self._peers]
        best: tuple[History, int] | None = None
        best_len = 0
        for where, found in sources:
            if not found:
                continue
            for at in reversed(found[-_CANDIDATES:]):  # the most recent first
                if where is self and at >= end:  # the suffix itself
                    continue
                length, room = n, min(at, end)  # a peer's match may lie past our end
                while (
                    length < self._max
                    and room - length > 0
                    and where._at(at - length - 1) == self._at(end - length - 1)
                ):
                    length += 1
                if length > best_len:
                    best, best_len = (where, at), length
                    if length == self._max:
                        break
            if best_len == self._max:
                break
        if best is None:
            return None
        where, at = best
        stop = min(at + limit, end) if where is self else min(at + limit, len(where))
        tokens = where._slice(at, stop)
        return Draft(tokens, best_len) if tokens else None


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


class Acceptance:
    """The chance that a drafted token is accepted, given the one before it was.

    Starts from what grounded text does (the tables above: a long match copies its
    document and is accepted nearly whole), since a draft is the only way to measure its
    rate. Then it is learned per match length over the engine's life (decaying, so it
    follows the workload), and per sequence: a sequence's own record counts more as it
    grows. A repeatable request run alone is planned from the start and its own record
    only (`own_rate`), never from what other requests taught the engine.
    """

    _DECAY = 0.995  # per recorded draft
    _PRIOR = 4.0  # a sequence's record weighs this many tokens of the prior
    _START_WEIGHT = 2.0  # the start weighs this many compared tokens
    FLOOR = 0.02  # never quite zero, so a draft that costs nothing is still tried

    def __init__(self, ngram_max: int) -> None:
        # per match length: [accepted, compared]; the live estimate mixes greedy and sampled
        # requests, so it starts from the sampled table, the lower of the two
        self._by_match = [
            [self._START_WEIGHT * self.start(m, greedy=False), self._START_WEIGHT]
            for m in range(ngram_max + 1)
        ]

    @staticmethod
    def start(match: int, *, greedy: bool) -> float:
        """The estimate before anything is learned, for a `match`-long match."""
        table = GREEDY_ACCEPTANCE if greedy else SAMPLED_ACCEPTANCE
        return table[min(match, len(table) - 1)]

    def rate(self, match: int, accepted: int, tried: int) -> float:
        """The estimate for a draft from a `match`-long match, for a sequence whose drafts so
        far had `accepted` of `tried` compared tokens accepted."""
        acc, seen = self._by_match[match]
        return self._shrunk(acc / seen, accepted, tried)

    def own_rate(self, match: int, accepted: int, tried: int, *, greedy: bool) -> float:
        """As `rate`, from the sequence's own record and the start alone: nothing learned
        from other requests moves it."""
        return self._shrunk(self.start(match, greedy=greedy), accepted, tried)

    def _shrunk(self, prior: float, accepted: int, tried: int) -> float:
        rate = (accepted + self._PRIOR * prior) / (tried + self._PRIOR)
        return max(rate, self.FLOOR)

    def record(self, match: int, drafted: int, accepted: int) -> None:
        stats = self._by_match[match]
        stats[0] = stats[0] * self._DECAY + accepted
        stats[1] = stats[1] * self._DECAY + compared(drafted, accepted)


def compared(drafted: int, accepted: int) -> int:
    """Drafted tokens the sampler was compared with: every accepted one and the first miss."""
    return accepted + 1 if accepted < drafted else accepted


class StepCost:
    """Seconds of one decode step by its batch rows, measured as the engine runs.

    The curve is kept in the units of its first measurements (`set`: before serving), times
    one scale for how much slower or faster every step runs now (`observe`). A fuller KV
    cache or a busier machine slows steps of every size alike, and most row counts are seen
    rarely: a point measured long ago and left unscaled would make the rows between it and
    a fresh one look nearly free. Each row count keeps a moving average on that curve; a
    count never seen is interpolated between its neighbours, or extended from the two
    largest beyond them.

    The engine only `set`s it, from its calibration before serving: a live step's rows are
    cut into passes (`BatchShape`), so its time is not the time of its row count, and
    `observe` is not fed from the engine.
    """

    # A step's surprise goes mostly to the scale (every point) and a little to its own
    # point, which so keeps the shape of the curve and follows it only slowly.
    _DRIFT = 0.2
    _ALPHA = 0.05

    def __init__(self) -> None:
        self._rows: list[int] = []
        self._curve: dict[int, float] = {}
        self._scale = 1.0

    @classmethod
    def fixed(cls, table: dict[int, float]) -> StepCost:
        """Costs from a table (rows -> time); the caller never `observe`s into it."""
        cost = cls()
        for rows, seconds in table.items():
            cost.set(rows, seconds)
        return cost

    def set(self, rows: int, seconds: float) -> None:
        """A step's time at today's scale, moving no other point (a measurement before
        serving)."""
        if rows not in self._curve:
            bisect.insort(self._rows, rows)
        self._curve[rows] = seconds / self._scale

    def observe(self, rows: int, seconds: float) -> None:
        """A step the engine decoded: it moves the scale of every point, then its own."""
        if not self._rows:
            self.set(rows, seconds)
            return
        self._scale *= (seconds / self.estimate(rows)) ** self._DRIFT
        point = seconds / self._scale
        old = self._curve.get(rows)
        if old is None:
            self.set(rows, seconds)
        else:
            self._curve[rows] = old + self._ALPHA * (point - old)

    def known(self) -> bool:
        return bool(self._rows)

    def estimate(self, rows: int) -> float:
        return self._scale * self._on_curve(rows)

    def _on_curve(self, rows: int) -> float:
        curve = self._curve
        exact = curve.get(rows)
        if exact is not None:
            return exact
        known = self._rows
        i = bisect.bisect_left(known, rows)
        if i == 0:
            return curve[known[0]]
        if i == len(known):
            if len(known) == 1:
                return curve[known[0]] * rows / known[0]
            lo, hi = known[-2], known[-1]
        else:
            lo, hi = known[i - 1], known[i]
        slope = max((curve[hi] - curve[lo]) / (hi - lo), 0.0)
        return curve[lo] + slope * (rows - lo)


def calibration_rows(draft_max: int, n_outputs_max: int) -> list[int]:
    """The batch sizes to time before serving: every count up to a whole draft and its fed
    token, then 24 and 32 for several sequences' rows together.

    CPU kernels work on rows in blocks, so the cost curve has steps: on an AMD EPYC with
    AVX-512, 4 rows cost 2.5 times 1 row but 5 rows 3.8 times, and 8 rows less than 7
    (`python -m bench.verify_cost`). Between two points an estimate is a straight line,
    which misses every step; measured at each count, the planner picks draft lengths
    that end where a block is full."""
    top = min(n_outputs_max, 32)
    sizes = set(range(1, min(draft_max + 1, top) + 1))
    sizes.update(rows for rows in (24, 32) if rows <= top)
    return sorted(sizes)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A sequence that could verify a draft this step."""

    rate: float  # Acceptance.rate for its draft
    length: int  # tokens in its draft
    slot: int = 0  # the slot it is fed on (the passes of a split KV cache follow slots)


@dataclass(frozen=True, slots=True)
class BatchShape:
    """How llama.cpp cuts a batch into passes over the weights (its ubatches), each of which
    costs a decode step of its own rows.

    With one KV stream (`kv_unified`) a batch goes in runs of `n_ubatch` rows. With a stream
    per slot, llama.cpp splits it "equally" (`llama_batch_allocr::split_equal`, sequential):
    a pass takes the same number of rows from each slot of a run of consecutive slots. So
    beside sequences that feed one row each, a sequence that feeds a draft finishes it in a
    pass of its own: at 8 in flight a draft costs a step of its rows alone, not the few
    rows more that a unified cache pays for it (`python -m bench.draft_passes`).
    """

    split: bool  # a KV stream per slot
    n_ubatch: int

    def passes(self, rows_by_slot: Sequence[tuple[int, int]]) -> list[int]:
        """The rows of each pass for a batch of (slot, rows) in slot order."""
        if not self.split:
            full, rest = divmod(sum(rows for _, rows in rows_by_slot), self.n_ubatch)
            return [self.n_ubatch] * full + ([rest] if rest else [])
        left = [[slot, rows] for slot, rows in rows_by_slot if rows > 0]
        passes = []
        while left:
            run = [left[0]]  # the consecutive slots from the lowest with rows left
            for entry in left[1:]:
                if entry[0] != run[-1][0] + 1 or len(run) == self.n_ubatch:
                    break
                run.append(entry)
            each = min(min(rows for _, rows in run), max(self.n_ubatch // len(run), 1))
            passes.append(each * len(run))
            for entry in run:
                entry[1] -= each
            left = [entry for entry in left if entry[1] > 0]
        return passes


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
) -> list[int]:
    """How many drafted tokens each candidate verifies this step (0: none).

    Each extra row for a sequence whose draft already has j - 1 rows is worth rate^j
    expected tokens. Rows go to the best such gains first, and the step takes as many as
    maximise expected tokens per second: (generating + gain) / (step time + sampling time).
    `decode_rows` is the step's batch without drafts and prompt chunks, `prompt_rows` the
    prompt tokens waiting for it, `batch_rows` the most a batch holds.

    A prompt chunk only takes rows; it is weighed as absent. Its rows are paid for whether
    drafts come or not, and yield no token: counted in, they make the step slow, so that
    any draft row looks cheap against its tokens per second. Measured with prompts of a few
    hundred tokens at 16 in flight, such drafts cost 6 ms a row where a token of plain
    decoding cost 4.4.

    With a `shape` and `fed`, the step's rows by slot without drafts (prompt chunks
    included), a draft costs at least the passes it adds (`BatchShape`): with a KV stream
    per slot, a draft beside other sequences is decoded in a pass of its own.
    """
    take = [0] * len(candidates)
    free_rows = rows_left(decode_rows, prompt_rows, batch_rows)
    if not candidates or free_rows <= 0 or not cost.known():
        return take
    gains: list[tuple[float, int]] = []
    for i, c in enumerate(candidates):
        g = 1.0
        for _ in range(c.length):
            g *= c.rate
            gains.append((g, i))
    gains.sort(key=lambda item: -item[0])
    del gains[free_rows:]

    base = cost.estimate(decode_rows)
    passes_of = _pass_cost(shape, fed, cost) if shape is not None and len(fed) > 1 else None
    without = passes_of({}) if passes_of is not None else 0.0
    best_k, best = 0, generating / (base + sample_seconds * generating)
    gained = float(generating)
    added: dict[int, int] = {}
    for k, (g, i) in enumerate(gains, start=1):
        gained += g
        step = cost.estimate(decode_rows + k)
        if passes_of is not None:
            slot = candidates[i].slot
            added[slot] = added.get(slot, 0) + 1
            step = max(step, base + passes_of(added) - without)
        value = gained / (step + sample_seconds * gained)
        if value > best:
            best_k, best = k, value
    for _, i in gains[:best_k]:
        take[i] += 1
    return take


def _pass_cost(
    shape: BatchShape, fed: Sequence[tuple[int, int]], cost: StepCost
) -> Callable[[dict[int, int]], float]:
    """The seconds of a batch of `fed` rows by slot plus drafted rows by slot, pass by pass."""

    def seconds(drafted: dict[int, int]) -> float:
        rows = dict(fed)
        for slot, n in drafted.items():
            rows[slot] = rows.get(slot, 0) + n
        return sum(cost.estimate(n) for n in shape.passes(sorted(rows.items())))

    return seconds
