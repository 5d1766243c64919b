"""The runner: executes step plans on one llama.cpp context.

`execute(plan) -> StepResult` does the plan's KV edits, writes its rows with the one row
writer (llama.cpp's `common_batch_add`, a run of one slot's rows at a time) and decodes them
at the one `llama_decode` site, which also times the step when the plan asks. The warm-up
and the calibration before serving are plans of its own through the same two.

Pitfalls it keeps away from (llama.cpp asserts, which abort the process): a batch over
`n_batch` rows or over `n_outputs_max` rows with logits (the scheduler plans within both),
sampling a row without logits, positions of a sequence that are not contiguous.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import llama_cpp as ll

from genstruct_service.engine.backend.model import LoadedModel
from genstruct_service.engine.backend.sampling import ConstrainedSampler, make_sampler
from genstruct_service.engine.backend.threadpool import ThreadPools
from genstruct_service.engine.plan import RowKind, SlotRows, StepPlan, StepResult
from genstruct_service.engine.sequence import TokenSampler
from genstruct_service.engine.types import Sampling
from genstruct_service.errors import ModelError

log = logging.getLogger(__name__)

_CALIBRATE_ROUNDS = 3  # each size timed this often, its fastest kept...
_CALIBRATE_BUDGET = 5.0  # ...while the rounds so far took less than this (seconds)


class Runner:
    """One context, one `llama_batch`, and the samplers' shared buffers."""

    def __init__(self, loaded: LoadedModel, n_batch: int) -> None:
        self._loaded: LoadedModel | None = loaded
        self._ctx = loaded.ctx
        self._mem = loaded.mem
        self._vocab = loaded.vocab
        self._n_batch = n_batch
        self.tokenizer = loaded.tokenizer
        self._constrained = ConstrainedSampler(loaded.ctx, loaded.tokenizer.n_vocab)
        batch = ll.llama_batch_init(n_batch, 0, 1)
        self._batch: Any = batch
        self._b_token = batch.token
        self._b_pos = batch.pos
        self._b_logits = batch.logits
        self._b_seq = [batch.seq_id[i] for i in range(n_batch)]
        for i in range(n_batch):
            batch.n_seq_id[i] = 1

    @property
    def pools(self) -> ThreadPools | None:
        """The CPU thread pools attached to the context (None once freed)."""
        return self._loaded.pools if self._loaded is not None else None

    def sampler(
        self, sampling: Sampling, seed: int, *, grammar: str | None, banned: Sequence[int]
    ) -> TokenSampler:
        return make_sampler(
            self._ctx, self._vocab, self.tokenizer.n_vocab, self._constrained, sampling, seed,
            grammar=grammar, banned=banned,
        )

    # -- steps

    def execute(self, plan: StepPlan) -> StepResult:
        """The plan's KV edits, then its batch (none when it has no rows)."""
        started = time.perf_counter()
        mem = self._mem
        for source, target in plan.copies:
            ll.llama_memory_seq_cp(mem, source, target, -1, -1)
        for slot, pos in plan.trims:
            ll.llama_memory_seq_rm(mem, slot, pos, -1)
        for slot in plan.clears:
            ll.llama_memory_seq_rm(mem, slot, -1, -1)
        for move in plan.moves:
            if move.source >= 0:
                ll.llama_memory_seq_cp(mem, move.source, move.target, -1, -1)
                ll.llama_memory_seq_rm(mem, move.source, -1, -1)
            else:
                ll.llama_memory_seq_rm(mem, move.target, -1, -1)
        if not plan.n_rows:
            return StepResult(True, 0, 0.0, started)
        # the one row writer, llama.cpp's common_batch_add: each run of one slot's rows at
        # consecutive positions, logits from `logits_from` on (written out in this method,
        # which runs every step, as a call per run costs cache misses after each decode)
        b_token, b_pos, b_logits, b_seq = self._b_token, self._b_pos, self._b_logits, self._b_seq
        at = 0  # the run's first batch row
        for rows in plan.rows:
            slot, shift, from_row = rows.slot, rows.first_pos - at, at + rows.logits_from
            for n, token in enumerate(rows.tokens, at):
                b_token[n] = token
                b_pos[n] = shift + n
                b_seq[n][0] = slot
                b_logits[n] = n >= from_row
            at += len(rows.tokens)
        # the one decode site; timed to its end when asked (a GPU decodes asynchronously)
        self._batch.n_tokens = at
        decoding = time.perf_counter()
        rc = ll.llama_decode(self._ctx, self._batch)
        seconds = 0.0
        if plan.timed and rc == 0:
            ll.llama_synchronize(self._ctx)
            seconds = time.perf_counter() - decoding
        if rc not in (0, 1):
            raise RuntimeError(f"llama_decode returned {rc}")
        return StepResult(rc == 0, at, seconds, started)  # 1: no room in the KV cache

    # -- before serving

    def warm_up(self) -> None:
        """Decode one batch before serving, as llama-server does.

        A broken build, an instruction the CPU lacks or a device out of memory then fails
        here, while health still says NOT_SERVING, instead of on the first request. The
        batch is a few dozen tokens, so the kernels of prompt processing run too.
        """
        started = time.perf_counter()
        bos = int(ll.llama_vocab_bos(self._vocab))
        eos = int(ll.llama_vocab_eos(self._vocab))
        fill = eos if eos >= 0 else 0
        tokens = [bos if bos >= 0 else fill] + [fill] * (min(self._n_batch, 32) - 1)
        log.info("warm-up: decoding %d tokens once before serving", len(tokens))
        self._alone(tokens, len(tokens) - 1, "the warm-up decode")
        log.info("warm-up done in %.2f s", time.perf_counter() - started)

    def calibrate(self, sizes: Sequence[int]) -> dict[int, float]:
        """Seconds of decode steps of each of `sizes` rows, with logits at every row as
        drafts have them: the first estimate of what verifying a draft costs.

        The sizes are timed in interleaved rounds and each keeps its fastest: another
        process on the same cores only ever adds time (llama.cpp's threads wait on each
        other, so a step they share can take a hundred times its own). A second and a third
        round run only while the whole has taken under `_CALIBRATE_BUDGET` seconds, so a
        large model on a few cores measures once instead of holding up its start."""
        timings: dict[int, list[float]] = {rows: [] for rows in sizes}
        started = time.perf_counter()
        for round_ in range(_CALIBRATE_ROUNDS):
            if round_ and time.perf_counter() - started > _CALIBRATE_BUDGET:
                break
            for rows in sizes:
                timings[rows].append(self._alone([0] * rows, 0, "a calibration decode"))
        return {rows: min(seconds) for rows, seconds in timings.items()}

    def _alone(self, tokens: list[int], logits_from: int, what: str) -> float:
        """One of the runner's own batches (slot 0, from position 0), its cells cleared
        after; its seconds, or ModelError saying that `what` failed."""
        rows = SlotRows(0, RowKind.PROMPT, 0, tokens, logits_from, None, None)
        plan = StepPlan(rows=(rows,), n_rows=len(tokens), prompt_rows=len(tokens), timed=True)
        try:
            result = self.execute(plan)
        except RuntimeError as exc:
            raise ModelError(f"{what} failed ({exc})") from exc
        finally:
            ll.llama_memory_clear(self._mem, True)
        if not result.ok:
            raise ModelError(f"{what} failed (llama_decode returned 1)")
        return result.seconds

    def close(self) -> None:
        """Free the batch, the context and the model (idempotent)."""
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._loaded is not None:
            self._loaded.free()
            self._loaded = None

