"""What one engine step does, as values: the scheduler's `StepPlan` and the runner's
`StepResult` (vLLM's SchedulerOutput and ModelRunnerOutput).

The plan says everything the runner writes and everything update reads back: for each slot
in slot order its rows, their first position, which of them have logits, and their kind;
the KV cells copied, trimmed, dropped and moved before the batch; the requests admitted, refused and
ended before it. Nothing about a step is written onto requests and read back later.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from genstruct_service.engine.request import Job, Request
    from genstruct_service.engine.sequence import Sequence


class RowKind(enum.Enum):
    PROMPT = "prompt"  # a chunk of a request's prompt, logits at its last token only
    DECODE = "decode"  # a sequence's pending tokens (sampled, or forced), logits at the last
    VERIFY = "verify"  # a sequence's sampled token and its draft, logits at every row


@dataclass(slots=True)
class SlotRows:
    """A run of rows of one slot: `tokens` at positions `first_pos` on. Never changed once
    planned. (A class with slots, not a tuple: the scheduler builds one per sequence per
    step, which costs a third of a NamedTuple's, and its fields read four times faster.)"""

    slot: int
    kind: RowKind
    first_pos: int
    tokens: list[int]
    logits_from: int  # rows from this index on have logits (len(tokens): none)
    request: Request | None  # None for the runner's own batches (warm-up, calibration)
    seq: Sequence | None  # the sequence fed (None for a prompt chunk: the request's own)
    draft_match: int = 0  # VERIFY: the length of the match its draft came from
    draft_borrowed: bool = False  # VERIFY: its draft came from another request's text

    @property
    def n_logits(self) -> int:
        return len(self.tokens) - self.logits_from


class SlotMove(NamedTuple):
    """A sequence takes a slot: a lower free one, its KV cells copied there from `source`,
    or (`source` -1) one just admitted to, whose cells are cleared first."""

    seq: Sequence
    source: int
    target: int


@dataclass(slots=True)
class StepPlan:
    """One step, decided by the scheduler before anything runs; never changed after. (Not
    frozen: a frozen dataclass sets each of its 13 fields through a call, three times the
    cost of building this one, and the plan is built every step.)"""

    rows: tuple[SlotRows, ...]  # in slot order: a split KV cache decodes a run of slots at once
    n_rows: int
    prompt_rows: int  # rows of kind PROMPT
    # KV edits before the batch, in this order
    copies: tuple[tuple[int, int], ...] = ()  # (source, target): a prompt to more slots
    trims: tuple[tuple[int, int], ...] = ()  # (slot, pos): cells from pos on are dropped
    clears: tuple[int, ...] = ()  # slots whose cells are all dropped (ended, or just taken)
    moves: tuple[SlotMove, ...] = ()  # slots taken on admission, then moves down
    admitted: tuple[Request, ...] = ()  # start this step, on their tickets' slots
    refused: tuple[tuple[Job, BaseException], ...] = ()  # could not join: told why
    cancelled: tuple[Request, ...] = ()  # ended before this step, their slots cleared
    timed: bool = False  # wait for the decode to end and time it (a GPU decodes async)

    @property
    def n_logits(self) -> int:
        return sum(rows.n_logits for rows in self.rows)


@dataclass(slots=True)
class StepResult:
    """What the runner did with a plan."""

    ok: bool  # False: llama.cpp found no room in the KV cache for the batch
    n_rows: int
    seconds: float  # the decode, measured only when the plan is timed (else 0)
    started: float  # when the runner took the plan (time.perf_counter)
