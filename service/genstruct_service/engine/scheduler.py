"""The step scheduler: what the next decode step does, decided before it runs, as a `StepPlan`.

Pure: no llama.cpp, no threads. Each step, in this order (vLLM V1's `Scheduler.schedule`):
requests cancelled since the last step leave (their slots come back at once); waiting
requests are admitted on the lowest free slots (engine/admission.py); with a KV stream per
slot, sequences move down into free slots below them, so the busy slots stay one run; the
drafts that pay are chosen (engine/drafts.py); and the batch is composed. Composing: one
row (or the pending forced tokens) and its draft for every generating sequence, then prompt
chunks for prefilling requests, first admitted first, up to `n_batch` rows; written in slot
order, since a split KV cache decodes a run of consecutive slots in one ubatch and starts
another wherever the next row's slot is not the next one.

The scheduler changes only its own books (slots, cells, the running list); the requests are
changed by the engine's update (engine/update.py), which tells it what to give back:
`release` a sequence's slot, `trim` a rejected draft's cells, `copy` a prompt.

Where reuse of a prompt's cells across requests would go (not built): admission would pick a
slot whose cells hold a prefix of the prompt (engine/admission.py), the plan's first prompt
chunk would start at that prefix's length (`Request.computed`) instead of 0, and the slot
would not be cleared when taken.
"""

from __future__ import annotations

from operator import attrgetter

from genstruct_service.engine.admission import Admission
from genstruct_service.engine.drafts import DraftChooser
from genstruct_service.engine.plan import RowKind, SlotMove, SlotRows, StepPlan
from genstruct_service.engine.request import Job, Request, Status
from genstruct_service.engine.sequence import Sequence

_BY_SLOT = attrgetter("slot")
# globals read faster than an Enum class's attributes, on every step
_GENERATING, _VERIFY, _DECODE = Status.GENERATING, RowKind.VERIFY, RowKind.DECODE

class StepScheduler:
    """The requests running, the admission books, and the plan of every step."""

    def __init__(
        self, n_slots: int, n_cells: int, *, n_batch: int, split_kv: bool,
        drafts: DraftChooser | None,
    ) -> None:
        self.admission: Admission[Request] = Admission(n_slots, n_cells)
        self.running: list[Request] = []  # holding slots, in admission order
        self.drafts = drafts  # None without speculation
        self._n_batch = n_batch
        self._split_kv = split_kv
        # KV edits that update asked for, done by the runner before the next batch
        self._copies: list[tuple[int, int]] = []
        self._trims: list[tuple[int, int]] = []
        self._clears: list[int] = []
        # the queue, the free slots or the cells changed since admission last ran: until
        # then, admission would start nothing new and no gap could have opened
        self._books_changed = False

    # -- the queue

    @property
    def waiting(self) -> int:
        return self.admission.waiting

    @property
    def has_work(self) -> bool:
        return bool(self.running) or self.admission.waiting > 0

    def enqueue(self, request: Request) -> None:
        self.admission.enqueue(request.ticket)
        self._books_changed = True

    def drain(self) -> list[Request]:
        """Empty the queue (shutdown); returns what was waiting, in order."""
        return [ticket.item for ticket in self.admission.drain()]

    # -- what update gives back

    def release(self, request: Request, seq: Sequence) -> None:
        """A sequence ended: its slot and its share of cells come back, its cells go."""
        self.admission.release(request.ticket, seq.slot)
        self._books_changed = True
        self._clears.append(seq.slot)

    def trim(self, seq: Sequence) -> None:
        """A draft's rejected tail: the cells from the sequence's position on go."""
        self._trims.append((seq.slot, seq.pos))

    def copy(self, source: int, target: int) -> None:
        """A prompt decoded on `source` is copied to another generation's slot."""
        self._copies.append((source, target))

    def retire(self, request: Request) -> None:
        self.running.remove(request)

    # -- the plan

    def schedule(
        self, *, cancelled: bool, refused: tuple[tuple[Job, BaseException], ...] = ()
    ) -> StepPlan:
        """The next step. `cancelled`: some caller cancelled since the last step."""
        gone = self._drop_cancelled() if cancelled else ()
        # most steps admit nothing and move nothing: only a step after a change to the
        # books (a request came or ended) does the bookkeeping of either
        admitted: tuple[Request, ...] = ()
        moves: list[SlotMove] = []
        if self._books_changed:
            self._books_changed = False
            admission = self.admission
            if admission.waiting:
                admitted = tuple(ticket.item for ticket in admission.admit())
                self.running.extend(admitted)
                moves = [
                    SlotMove(seq, -1, slot)
                    for r in admitted
                    for seq, slot in zip(r.seqs, r.ticket.slots, strict=True)
                ]
            if self._split_kv and admission.has_gap:
                moves.extend(self._close_gaps({move.seq: move.target for move in moves}))
        # the slots that update gives the sequences after this step
        moved = {move.seq: move.target for move in moves} if moves else {}
        # the batch (written out here: this runs on every step, when the CPU's caches hold
        # the model's weights and none of this code, and each call costs cache misses)
        cap = self._n_batch
        drafts = (
            self.drafts.choose(self.running, draining=not self.admission.waiting)
            if self.drafts is not None
            else None
        )
        generating, verify, decode = _GENERATING, _VERIFY, _DECODE
        parts: list[SlotRows] = []
        add = parts.append
        n = 0
        for request in self.running:
            if request.status is not generating:
                continue
            for seq in request.seqs:
                pending = seq.pending
                if not pending or seq.finish_reason is not None:
                    continue
                slot = moved.get(seq, seq.slot) if moved else seq.slot
                draft = drafts.get(seq) if drafts else None
                if draft is not None:
                    tokens = [pending[0], *draft.tokens]
                    add(SlotRows(slot, verify, seq.pos, tokens, 0, request, seq,
                                 draft.match, draft.borrowed))
                    n += len(tokens)
                    continue
                rows = min(len(pending), cap - n)
                if rows:
                    logits_from = rows - 1 if rows == len(pending) else rows
                    add(SlotRows(slot, decode, seq.pos, pending[:rows], logits_from, request, seq))
                    n += rows
        prompt_rows = 0
        for request in self.running:
            if request.status is generating or n >= cap:
                continue
            left = request.prompt_left
            if left <= 0:
                continue
            take = min(left, cap - n)
            start = request.computed
            logits_from = take - 1 if take == left else take
            chunk = request.tokens[start : start + take]
            first = request.seqs[0]  # the prompt is decoded on the first generation's slot
            slot = moved.get(first, first.slot) if moved else first.slot
            add(SlotRows(slot, RowKind.PROMPT, start, chunk, logits_from, request, None))
            n += take
            prompt_rows += take
        if len(parts) > 1:
            parts.sort(key=_BY_SLOT)  # the batch's rows in slot order
        copies, trims, clears = self._copies, self._trims, self._clears
        if copies or trims or clears:
            self._copies, self._trims, self._clears = [], [], []
        return StepPlan(
            rows=tuple(parts), n_rows=n, prompt_rows=prompt_rows, copies=tuple(copies),
            trims=tuple(trims), clears=tuple(clears), moves=tuple(moves), admitted=admitted,
            refused=refused, cancelled=gone, timed=self.drafts is not None,
        )

    def _drop_cancelled(self) -> tuple[Request, ...]:
        gone = [ticket.item for ticket in self.admission.drop(lambda t: t.item.job.cancelled)]
        for request in [r for r in self.running if r.job.cancelled]:
            self.running.remove(request)
            for seq in request.seqs:
                if seq.finish_reason is None:
                    self.release(request, seq)
            gone.append(request)
        return tuple(gone)

    def _close_gaps(self, taken: dict[Sequence, int]) -> list[SlotMove]:
        """Move sequences from the highest busy slots into lower free ones.

        With a stream per slot, llama.cpp decodes one run of consecutive slots per pass over
        the weights, and a free slot below busy ones (a generation ended, and nothing that
        waits could take its slot) splits every step in two until it is filled. A move costs
        a copy of one stream at the next decode, too little to time on a CPU (14 decoding
        rows took 88 ms with one and without, Gemma 3 270M). Prefilling requests move too:
        when documents end one after another and the next arrive just after, each new one
        prefills on the top slot, and a gap below it would last its whole prefill.
        """
        live = sorted(
            (
                (taken.get(seq, seq.slot), seq, r)
                for r in self.running
                for seq in r.seqs
                if seq.finish_reason is None
            ),
            key=lambda entry: entry[0],
            reverse=True,
        )
        moves = []
        for slot, seq, request in live:
            lower = self.admission.move_down(request.ticket, slot)
            if lower is None:
                break
            moves.append(SlotMove(seq, slot, lower))
        return moves
