"""What a decode step costs, as the draft planner weighs it: the step time by batch rows
(`StepCost`, measured before serving, with fixed tables for repeatable requests), the batch
sizes to measure, and how llama.cpp cuts a batch into passes over the weights (`BatchShape`).

Pure Python, tested without a model (tests/unit/test_speculation_plan.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

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

# The same on a GPU, for a model with every layer offloaded: the Genstruct-7B-shaped model
# (Q4_K_M, random weights) on an NVIDIA H200, after a 384-token prompt, median of 5
# (`python -m bench.verify_cost --model synthetic`, bench/results/gpu/2026-12-04-h200-
# fd15c6ef). A step reads the weights once whatever its rows: 17 rows cost 2 steps.
GPU_ROW_COST = {1: 1.0, 2: 1.18, 3: 1.20, 5: 1.43, 9: 1.84, 17: 2.02}


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
        self._prices = [0.0]  # estimate(n) at index n, kept until the curve changes

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
        self._prices = [0.0]

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
        self._prices = [0.0]

    def known(self) -> bool:
        return bool(self._rows)

    def largest(self) -> int:
        """The most rows measured (0: none)."""
        return self._rows[-1] if self._rows else 0

    def estimate(self, rows: int) -> float:
        return self._scale * self._on_curve(rows)

    def prices(self, rows: int) -> list[float]:
        """`estimate(n)` at index n for every n up to `rows` (0 for no rows): the planner
        prices a step many times over, and a list lookup is what it can afford. Read it,
        never change it."""
        table = self._prices
        if len(table) <= rows:
            table.extend(self.estimate(n) for n in range(len(table), rows + 1))
        return table

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

    def seconds(
        self, slots: Sequence[int], rows: Sequence[int], price: Sequence[float], limit: int
    ) -> float | None:
        """The summed `price` of the passes of `rows[i]` rows on `slots[i]` (slots in
        order), or None when a pass has more than `limit` rows (`price` lists at least that
        many). The same passes as `passes`, counted without listing them: the draft planner
        asks this once for every row it weighs.

        With a stream per slot, the passes over a run of consecutive slots first take the
        rows every slot of it has, then go on in the runs that the slots with rows left
        make: a Cartesian tree over the rows, walked once with a stack of rising heights.
        Each node, `width` slots that share `depth` more rows than around them, is decoded
        in passes of `n_ubatch // width` rows per slot.
        """
        if not self.split:
            full, rest = divmod(sum(rows), self.n_ubatch)
            if (self.n_ubatch if full else rest) > limit:
                return None
            return (full * price[self.n_ubatch] if full else 0.0) + price[rest]
        if len(rows) > self.n_ubatch and sum(1 for n in rows if n) > self.n_ubatch:
            # a run is cut at n_ubatch slots
            passes = self.passes([(slot, n) for slot, n in zip(slots, rows, strict=True) if n])
            return None if max(passes) > limit else sum(price[n] for n in passes)
        total = 0.0
        stack: list[tuple[int, int]] = []  # (first column, rows), rows rising
        end = len(rows)
        for i in range(end + 1):
            height = rows[i] if i < end else 0
            # a gap between slot numbers ends every run, as no rows would
            floor = 0 if i == end or (i and slots[i] != slots[i - 1] + 1) else height
            start = i
            while stack and stack[-1][1] >= floor:
                left, top = stack.pop()
                below = stack[-1][1] if stack and stack[-1][1] > floor else floor
                width, depth = i - left, top - below
                if depth > 0:
                    each = self.n_ubatch // width
                    full, rest = divmod(depth, each)
                    if (each if full else rest) * width > limit:
                        return None
                    if full:
                        total += full * price[each * width]
                    if rest:
                        total += price[rest * width]
                start = left
            if floor < height:  # after a gap: this column starts a run of its own
                start = i
            if height and (not stack or stack[-1][1] < height):
                stack.append((start, height))
        return total

