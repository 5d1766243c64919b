"""The engine's update: the one place that changes requests and sends events to callers.

After the runner executed a plan (vLLM's `update_from_output`): admitted requests start,
moved sequences take their new slots, decoded tokens enter the KV cache, each row with
logits is sampled by its sequence's own sampler (a verified draft through `verify`), and
finished requests are completed. Sampling is done here, not in the runner: llama.cpp's
samplers are stateful, and whether a sequence samples its next drafted row depends on what
its last token did to it (ended it, or forced the answer marker in behind it), as
llama-server samples in its slot loop.

Shutdown and failure end requests here too, so every event leaves from this module.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

from genstruct_service.engine.drafts import DraftChooser
from genstruct_service.engine.inbox import Inbox
from genstruct_service.engine.plan import RowKind, SlotRows, StepPlan, StepResult
from genstruct_service.engine.request import Job, Outbox, Request, Status
from genstruct_service.engine.scheduler import StepScheduler
from genstruct_service.engine.sequence import Sequence
from genstruct_service.engine.types import (
    Completed,
    EngineEvent,
    FinishReason,
    Generation,
    Timings,
    TokenDelta,
)
from genstruct_service.engine.verify import drafted_hits, verify
from genstruct_service.errors import Draining, ModelError

_KV_FULL = "the KV cache is full; retry later"
_VERIFY = RowKind.VERIFY  # a global reads faster than an Enum class's attribute
_SHUTTING_DOWN = "the engine is shutting down"


class Updater:
    """Applies step results to the running requests and tells their callers."""

    def __init__(
        self, scheduler: StepScheduler, inbox: Inbox, drafts: DraftChooser | None
    ) -> None:
        self._scheduler = scheduler
        self._inbox = inbox
        self._drafts = drafts
        self._outbox = Outbox()

    def update(self, plan: StepPlan, result: StepResult) -> None:
        """Apply one step's result; its events leave at the end, whatever happened.

        Every row with logits is sampled, in batch order. Its loop is written out here, in
        one function, because it runs after every decode, when the CPU's caches hold the
        model's weights and none of this code: each further function it calls costs a few
        microseconds of cache misses per step.
        """
        outbox = self._outbox
        try:
            if plan.refused or plan.cancelled or plan.admitted or plan.moves:
                self._start_and_end(plan, result.started)
            if not result.ok:  # no room in the KV cache: fail the requests in this batch
                for failed in {rows.request: None for rows in plan.rows if rows.request}:
                    self._fail(failed, ModelError(_KV_FULL))
                return
            if not result.n_rows:
                return
            now = time.perf_counter()
            n_sampled = 0
            ended: list[Request] = []
            streaming = False
            at = 0  # the batch row of the run's first row: runs are written in plan order
            for rows in plan.rows:
                first_row = at
                n = len(rows.tokens)
                at += n
                request = rows.request
                if request is None:
                    continue
                streaming = streaming or request.stream
                seq = rows.seq
                if seq is None:  # a chunk of its prompt
                    request.computed += n
                    if rows.logits_from < n:
                        n_sampled += self._first_tokens(request, first_row + rows.logits_from)
                        request.first_token = now
                        if request.finished:
                            ended.append(request)
                    continue
                if rows.kind is _VERIFY:
                    n_sampled += self._verify(request, seq, rows, first_row)
                else:
                    seq.pos += n  # Sequence.advance, written out
                    del seq.pending[:n]
                    if rows.logits_from < n:
                        n_sampled += 1
                        token = seq.sampler.sample(first_row + rows.logits_from)
                        # _append, written out
                        if not seq.append(token) and seq.finish_reason is not None:
                            self._ended(request, seq)
                if seq.finish_reason is not None and request.finished:
                    ended.append(request)
            if self._drafts is not None and n_sampled:
                self._drafts.observe_sampling(time.perf_counter() - now, n_sampled)
            if streaming:  # only requests with rows this step have new text, or can have ended
                for rows in plan.rows:
                    fed = rows.request
                    if fed is not None and fed.stream and not fed.finished:
                        deltas = _deltas(fed.seqs)
                        if deltas:
                            outbox.put(fed.job, deltas)
            for request in ended:
                self.complete(request)
        finally:
            if outbox.items:
                outbox.flush()

    def _start_and_end(self, plan: StepPlan, started: float) -> None:
        """Requests refused, cancelled and admitted before the step, and sequences moved."""
        for job, error in plan.refused:
            self._outbox.put(job, error)
        for gone in plan.cancelled:
            # the scheduler gave their slots back already, so that others could take them
            for seq in gone.seqs:
                seq.slot = -1
            self._end(gone)
        for request in plan.admitted:
            request.status = Status.PREFILLING
            request.admitted = started
        for move in plan.moves:
            move.seq.slot = move.target

    def _first_tokens(self, request: Request, row: int) -> int:
        """The prompt is in: copy it to every generation's slot before any samples (one
        that ends on its first token frees its slot, and the first is the source)."""
        first = request.seqs[0]
        total = len(request.tokens)
        for seq in request.seqs:
            if seq is not first:
                self._scheduler.copy(first.slot, seq.slot)
            seq.pos = total
        request.status = Status.GENERATING
        for seq in request.seqs:
            self._append(request, seq, seq.sampler.sample(row))
        return len(request.seqs)

    def _verify(self, request: Request, seq: Sequence, rows: SlotRows, first_row: int) -> int:
        """Sample at the fed token's row and each drafted row while the draft holds; the
        rejected tail's cells go, and the first token that differed is fed next step."""
        draft = rows.tokens[1:]
        seq.advance(1)
        tokens = verify(draft, lambda i: seq.sampler.sample(first_row + i),
                        lambda token: self._append(request, seq, token))  # fmt: skip
        k, hits = len(draft), drafted_hits(draft, tokens)
        match, borrowed = rows.draft_match, rows.draft_borrowed
        if self._drafts is not None:
            self._drafts.acceptance.record(match, k, hits, borrowed=borrowed)
        seq.drafts.add(match, k, hits, borrowed=borrowed)
        request.draft_tokens += k
        request.accepted_draft_tokens += hits
        if seq.finish_reason is None:
            seq.advance(hits)  # in the cache already
            if hits < k:
                self._scheduler.trim(seq)
        return len(tokens)

    def _append(self, request: Request, seq: Sequence, token: int) -> bool:
        """A sampled token for `seq`; whether it goes on as the token alone to feed."""
        if seq.append(token):
            return True
        if seq.finish_reason is not None:
            self._ended(request, seq)
        return False

    def _ended(self, request: Request, seq: Sequence) -> None:
        """`seq` ended on the token it just took; what it wrote may draft for others."""
        if not request.first_token:
            request.first_token = time.perf_counter()
        if self._drafts is not None and seq.history is not None:
            self._drafts.recent.add(seq.history.generated)
        self._release(request, seq)

    def _release(self, request: Request, seq: Sequence) -> None:
        if seq.slot >= 0:
            self._scheduler.release(request, seq)
            seq.slot = -1
            self._inbox.slot_freed()
        seq.sampler.close()

    def _end(self, request: Request) -> None:
        """A request ends before its sequences did: cancelled, or the engine stops."""
        for seq in request.seqs:
            if seq.finish_reason is None:
                seq.finish(FinishReason.CANCELLED)
            self._release(request, seq)
        request.status = Status.DONE

    def complete(self, request: Request) -> None:
        """Send the last event of a request and give back its reservation."""
        self._end(request)
        self._scheduler.retire(request)
        now = time.perf_counter()
        submitted = request.job.submitted
        events: list[EngineEvent] = [*_deltas(request.seqs)]
        events.append(
            Completed(
                generations=tuple(
                    Generation(
                        index=s.index,
                        text=s.text.text,
                        finish_reason=s.finish_reason or FinishReason.CANCELLED,
                        completion_tokens=s.n_generated,
                    )
                    for s in request.seqs
                ),
                prompt_tokens=len(request.tokens),
                truncated=request.job.prompt.truncated,
                draft_tokens=request.draft_tokens,
                accepted_draft_tokens=request.accepted_draft_tokens,
                timings=Timings(
                    queue_seconds=request.admitted - submitted,
                    first_token_seconds=(request.first_token or now) - submitted,
                    total_seconds=now - submitted,
                ),
            )
        )
        if not request.job.cancelled:
            self._outbox.put(request.job, events)

    def _fail(self, request: Request, error: BaseException) -> None:
        self._end(request)
        self._scheduler.retire(request)
        self._outbox.put(request.job, error)

    def shut_down(self, inbox: Iterable[Job]) -> None:
        """The engine closes: running requests complete as they are, nothing else starts."""
        try:
            for request in list(self._scheduler.running):
                self.complete(request)
            for job in inbox:
                self._outbox.put(job, Draining(_SHUTTING_DOWN))
            for request in self._scheduler.drain():
                self._end(request)
                self._outbox.put(request.job, Draining(_SHUTTING_DOWN))
        finally:
            self._outbox.flush()

    def fail_everything(self, error: ModelError, inbox: Iterable[Job]) -> None:
        """The engine thread failed: every request in flight, running or not, is told."""
        try:
            for request in list(self._scheduler.running):
                with contextlib.suppress(Exception):
                    self._fail(request, ModelError(str(error)))
            for job in inbox:
                self._outbox.put(job, ModelError(str(error)))
            for request in self._scheduler.drain():
                self._outbox.put(request.job, ModelError(str(error)))
                request.status = Status.DONE
                for seq in request.seqs:
                    seq.sampler.close()
        finally:
            self._outbox.flush()


def _deltas(seqs: list[Sequence]) -> list[TokenDelta]:
    """This step's text of a streaming request: one delta per generation that wrote some."""
    deltas = []
    for seq in seqs:
        if seq.new_text:
            deltas.append(TokenDelta(seq.index, seq.take_text()))
    return deltas
