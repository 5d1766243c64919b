"""`LlamaEngine`: continuous batching over llama.cpp's low-level API on one engine thread.

Slots and sequences. A slot is one llama.cpp sequence id (0 <= id < n_parallel,
`n_seq_max = n_parallel`). A request with `num_generations = n` takes n slots at once: its
prompt is prefilled on the first, copied to the other n - 1 with `llama_memory_seq_cp`,
and every slot samples its first token from the same last-prompt logits with its own
sampler chain (seed + i). So `n_parallel` bounds the number of sequences decoded together,
whatever the mix of requests, and a request may ask for at most `n_parallel` generations.

The KV cache (engine/fitting.py's KvLayout). Split, the default as in llama-server: every
slot has a stream of `n_ctx / n_parallel` cells, and attention reads a sequence's own
stream only; the prompt's copy to another slot copies the stream, and so does moving a
generation into a lower free slot, which keeps the busy slots one run (`_close_gaps`). Unified
(`kv_unified`): one pool, where one long document may use most of the context and the
copy shares cells. Its price: CPU flash attention works on 64-row tiles of the batch and
skips only the cells masked for every row of a tile, so a step that mixes sequences reads
every cell in use. On 2 CPU cores, 15 decoding rows beside a 200-token prompt chunk took
1.9x as long unified as split (Gemma 3 270M; 1.5x with Genstruct-7B's layers).

Admission (engine/admission.py). A request reserves `prompt_tokens + n * max_tokens` KV
cells, which bounds what it can ever use, and starts when it has n slots and its cells; a
smaller request may go past one that does not fit yet, a bounded number of times. A
request that could not fit even in an empty engine is refused with ContextOverflow, or its
content cut to fit with Truncation.TRUNCATE (engine/fitting.py). Split, each generation's
slot holds the prompt and its max_tokens, so fitting bounds it and free slots are all
admission needs. Waiting requests are bounded by `max_queue` (QueueFull beyond).

Threads. Only the engine thread touches the model, context, batch and samplers. Prompts
are rendered and tokenized on a worker thread before a request joins (the vocabulary is
read-only), so the engine thread takes token ids. It hands results back through
`loop.call_soon_threadsafe`: the final result only, or for a streaming request one message
per step with that step's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp as ll

from genstruct_service.engine.backend import llama_log, threadpool
from genstruct_service.engine.backend.build_info import load_backends, read_build_info
from genstruct_service.engine.backend.gguf_info import engine_info
from genstruct_service.engine.backend.sampling import (
    ConstrainedSampler,
    build_chain,
    build_grammar,
    greedy_token,
    is_plain_greedy,
)
from genstruct_service.engine.backend.tokenizer import LlamaTokenizer
from genstruct_service.engine.cpus import available_cpus
from genstruct_service.engine.fitting import FittedPrompt, KvLayout, content_budget, fit_prompt
from genstruct_service.engine.admission import Admission, Ticket
from genstruct_service.engine.speculation import (
    STEEP_ROW_COST,
    Acceptance,
    Candidate,
    Draft,
    History,
    PromptNgrams,
    SpeculationSettings,
    StepCost,
    compared,
    plan_drafts,
    rows_left,
)
from genstruct_service.engine.text import TextAssembler
from genstruct_service.engine.types import (
    Completed,
    EngineEvent,
    EngineInfo,
    EngineStats,
    FinishReason,
    Generation,
    GenerationRequest,
    PromptFormat,
    Timings,
    TokenDelta,
    Truncation,
    sampling_problem,
)
from genstruct_service.errors import (
    InvalidRequest,
    ModelError,
    QueueFull,
    Unavailable,
)
from genstruct_service.grammar import ANSWER_RESERVE, ASSISTANT_MARK, GENSTRUCT_GBNF

log = logging.getLogger(__name__)

_ALL_LAYERS = 0x7FFFFFFF
DEFAULT_UBATCH = 512  # llama-server's
FLASH_ATTN = {
    "auto": ll.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": ll.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
CACHE_TYPES = {"f16": ll.GGML_TYPE_F16, "q8_0": ll.GGML_TYPE_Q8_0, "q4_0": ll.GGML_TYPE_Q4_0}
_ASSISTANT_BYTES = ASSISTANT_MARK.encode()
_CALIBRATE_ROWS = 32  # the largest step timed before serving
_CALIBRATE_ROUNDS = 3  # each size timed this often, its median kept


class _Job:
    """One request as both threads see it; `queue` is read only by the asyncio side."""

    __slots__ = (
        "cancelled", "done", "loop", "ngrams", "prompt", "queue", "request", "submitted",
    )

    def __init__(
        self,
        request: GenerationRequest,
        prompt: FittedPrompt,
        ngrams: PromptNgrams | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.request = request
        self.prompt = prompt  # the prompt's token ids, fitted before the engine thread
        self.ngrams = ngrams  # its n-gram index for drafts, None without speculation
        self.loop = loop
        self.queue: asyncio.Queue[Sequence[EngineEvent] | BaseException] = asyncio.Queue()
        self.submitted = time.perf_counter()
        self.cancelled = False  # set by the asyncio side, read by the engine thread
        self.done = False  # set by the asyncio side once the last event arrived

    def send(self, item: Sequence[EngineEvent] | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(slots=True, eq=False)
class _Seq:
    """One generation: a slot's sequence id, its sampler chain and its text."""

    index: int
    seq_id: int
    chain: Any  # the llama_sampler pointer, None once freed
    assembler: TextAssembler
    max_tokens: int
    grammar: Any = None  # constrained mode: the grammar sampler, apart from the chain
    greedy: bool = False  # the chain is a greedy sampler alone: take the argmax directly
    pos: int = 0
    feed: list[int] = field(default_factory=list)  # tokens to decode next, in order
    n_generated: int = 0
    finish: FinishReason | None = None
    out_row: int = -1  # batch row whose logits this step samples, or -1
    # constrained mode: bytes written from the first `[` on (the assistant marker)
    constrained: bool = False
    question_visible: bool = False
    marker: bytes | None = None
    # speculation: its tokens for drafting, this step's draft, and its record so far
    history: History | None = None
    draft: list[int] = field(default_factory=list)
    draft_match: int = 0
    spec_accepted: int = 0
    spec_compared: int = 0


@dataclass(slots=True, eq=False)
class _Active:
    """A request holding slots: prefilling its prompt, then generating."""

    job: _Job
    ticket: Ticket[_Job]  # its slots and KV reservation, in the scheduler's books
    tokens: list[int]
    truncated: bool
    admitted: float
    seqs: list[_Seq]
    n_prefilled: int = 0
    prefill_row: int = -1
    first_token: float = 0.0
    done: int = 0  # sequences finished
    in_batch: bool = False  # tokens of it are in the step's batch
    stream: bool = True  # the caller reads text as it comes (else: the final result only)
    repeatable: bool = False  # greedy or seeded: run alone, its text is the same every time
    seeded_sampled: bool = False  # under auto, drafted only when alone (see _plan_drafts)
    deltas: list[TokenDelta] = field(default_factory=list)  # this step's text, to stream
    drafted: int = 0  # drafted tokens verified, over all its generations
    accepted: int = 0  # of which the sampler agreed with


def _emit(active: _Active, index: int, text: str) -> None:
    """Text for a streaming caller: one delta per generation per step, merged."""
    if not active.stream:
        return
    deltas = active.deltas
    if deltas and deltas[-1].index == index:
        deltas[-1] = TokenDelta(index, deltas[-1].text + text)
    else:
        deltas.append(TokenDelta(index, text))


class LlamaEngine:
    """Continuous batching of Genstruct generations over one llama.cpp context.

    The constructor loads the model on the engine thread and returns once it is ready
    (raising ModelError if it cannot be loaded). `on_step(batch_tokens)` is called on the
    engine thread after every decode with the number of tokens in the batch; it must be
    cheap and thread-safe (e.g. a Prometheus histogram observe).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        model_name: str | None = None,
        prompt_format: PromptFormat,
        n_parallel: int = 4,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        flash_attn: str = "auto",
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        kv_unified: bool = False,
        max_queue: int = 64,
        speculation: SpeculationSettings | None = None,
        default_seed: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        if n_parallel < 1:
            raise ValueError("n_parallel must be at least 1")
        if n_batch < n_parallel:
            raise ValueError("n_batch must be at least n_parallel (one token per slot per step)")
        speculation = speculation or SpeculationSettings()
        if speculation.problems():
            raise ValueError("; ".join(speculation.problems()))
        if n_ctx < 16 or max_queue < 0:
            raise ValueError("n_ctx must be at least 16 and max_queue non-negative")
        if flash_attn not in FLASH_ATTN:
            raise ValueError(f"flash_attn must be one of {', '.join(FLASH_ATTN)}")
        for name, kind in (("cache_type_k", cache_type_k), ("cache_type_v", cache_type_v)):
            if kind not in CACHE_TYPES:
                raise ValueError(f"{name} must be one of {', '.join(CACHE_TYPES)}")
        self._model_path = str(model_path)
        self._model_name = model_name or Path(model_path).stem
        self._format = prompt_format
        self._n_parallel = n_parallel
        self._n_ctx = n_ctx
        self._n_batch = n_batch
        self._n_ubatch = min(n_ubatch or DEFAULT_UBATCH, n_batch)
        self._n_gpu_layers = n_gpu_layers
        self._n_threads = n_threads or available_cpus()
        self._n_threads_batch = n_threads_batch or self._n_threads
        self._flash_attn = flash_attn
        self._flash_attn_in_force = flash_attn  # "auto" resolved once the context exists
        self._cache_types = (cache_type_k, cache_type_v)
        self._kv_unified = kv_unified
        self._max_queue = max_queue
        self._spec = speculation
        self._default_seed = default_seed
        self._on_step = on_step

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[_Job] = []
        self._n_waiting = 0  # inbox + pending, under _lock
        self._cancel_epoch = 0
        self._closing = False
        self._broken: BaseException | None = None
        # wait_failed() callers, settled from the engine thread when it dies (under _lock)
        self._failure_waiters: list[asyncio.Future[BaseException]] = []
        self._busy = 0

        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._info: EngineInfo | None = None
        self._thread = threading.Thread(target=self._thread_main, name="llama-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error

    @classmethod
    async def open(cls, model_path: str | os.PathLike[str], **kwargs: object) -> LlamaEngine:
        """Load without blocking the event loop."""
        return await asyncio.to_thread(lambda: cls(model_path, **kwargs))  # type: ignore[arg-type]

    # ---------------------------------------------------------------- asyncio side

    @property
    def info(self) -> EngineInfo:
        assert self._info is not None
        return self._info

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                busy_slots=self._busy, queued=self._n_waiting, n_parallel=self._n_parallel
            )

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.tokenize(text, add_special=False))

    def content_budget(self, request: GenerationRequest) -> int:
        return content_budget(self._tokenizer, self._format, request, layout=self._layout)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        self._validate(request)
        self._check_open()
        # rendering and tokenizing a long document takes a while: not on the engine thread
        prompt, ngrams = await asyncio.to_thread(self._prepare, request)
        job = self._submit(request, prompt, ngrams)
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    job.done = True
                    raise item
                for event in item:
                    if isinstance(event, Completed):
                        job.done = True
                    yield event
                if job.done:
                    return
        finally:
            if not job.done:
                with self._wake:
                    job.cancelled = True
                    self._cancel_epoch += 1
                    self._wake.notify()

    async def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)

    async def wait_failed(self) -> BaseException:
        future: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._broken is not None:
                return self._broken
            self._failure_waiters.append(future)
        try:
            return await future
        finally:
            with self._lock, contextlib.suppress(ValueError):  # gone once the thread took it
                self._failure_waiters.remove(future)

    @staticmethod
    def _settle_failure(future: asyncio.Future[BaseException], error: BaseException) -> None:
        if not future.done():  # the waiter may have been cancelled meanwhile
            future.set_result(error)

    def _check_open(self) -> None:
        """Refuse at once when the engine is closing, has failed, or its queue is full."""
        if self._closing or self._broken is not None:
            raise Unavailable(
                "the engine is shutting down"
                if self._closing
                else f"the engine failed and must be restarted: {self._broken}"
            )
        if self._n_waiting >= self._max_queue:
            raise QueueFull(
                f"the queue is full ({self._max_queue} requests waiting for "
                f"{self._n_parallel} slots); retry later"
            )

    def _prepare(self, request: GenerationRequest) -> tuple[FittedPrompt, PromptNgrams | None]:
        """The prompt's ids and their n-gram index (on a worker thread)."""
        prompt = fit_prompt(self._tokenizer, self._format, request, layout=self._layout)
        if not self._spec.enabled:
            return prompt, None
        return prompt, PromptNgrams(prompt.tokens, self._spec.ngram_min)

    def _submit(
        self, request: GenerationRequest, prompt: FittedPrompt, ngrams: PromptNgrams | None
    ) -> _Job:
        job = _Job(request, prompt, ngrams, asyncio.get_running_loop())
        with self._wake:
            self._check_open()
            self._n_waiting += 1
            self._inbox.append(job)
            self._wake.notify()
        return job

    def _validate(self, request: GenerationRequest) -> None:
        s = request.sampling
        if request.truncation is Truncation.CHUNK:
            raise InvalidRequest(
                "truncation", "the engine takes one part of a chunked document at a time"
            )
        if not 1 <= request.num_generations <= self._n_parallel:
            raise InvalidRequest(
                "num_generations",
                f"must be between 1 and {self._n_parallel} (the engine's slots), "
                f"got {request.num_generations}",
            )
        problem = sampling_problem(s)
        if problem is not None:
            raise InvalidRequest(*problem)
        if request.constrained and s.max_tokens < self._min_constrained_tokens:
            raise InvalidRequest(
                "sampling.max_tokens",
                f"constrained output needs at least {self._min_constrained_tokens} tokens, "
                f"got {s.max_tokens}",
            )

    # ---------------------------------------------------------------- engine thread

    def _thread_main(self) -> None:
        try:
            self._load()
        except BaseException as exc:
            self._load_error = (
                exc if isinstance(exc, ModelError) else ModelError(f"cannot load model: {exc}")
            )
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        except BaseException as exc:
            log.exception("the engine thread failed")
            with self._lock:
                self._broken = exc
                waiters, self._failure_waiters = self._failure_waiters, []
            try:
                # ModelError maps to UNAVAILABLE, so the callers in flight retry elsewhere
                self._fail_everything(ModelError(f"the engine failed and must be restarted: {exc}"))
            finally:
                # after the calls in flight were told, so a draining server sees them end
                for future in waiters:
                    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                        future.get_loop().call_soon_threadsafe(self._settle_failure, future, exc)
        finally:
            self._free()

    def _load(self) -> None:
        if not Path(self._model_path).is_file():
            raise ModelError(f"model file not found: {self._model_path}")
        ll.llama_backend_init()
        load_backends()
        # llama-cpp-python prints every llama.cpp log line unless its logger has a level
        quiet = logging.getLogger("llama-cpp-python")
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.WARNING)
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = _ALL_LAYERS if self._n_gpu_layers < 0 else self._n_gpu_layers
        model = ll.llama_model_load_from_file(self._model_path.encode(), mparams)
        if not model:
            raise ModelError(f"llama.cpp could not load {self._model_path} (not a GGUF model?)")
        self._model = model
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = self._n_ctx
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = self._n_ubatch
        cparams.n_seq_max = self._n_parallel
        cparams.n_threads = self._n_threads
        cparams.n_threads_batch = self._n_threads_batch
        cparams.kv_unified = self._kv_unified
        # Sliding-window layers (Gemma 2 and 3) keep only their window plus a ubatch of cells,
        # as llama-server does; llama.cpp's own default sizes them like the full layers. Its
        # price, that cells leaving the window are gone, costs nothing here: no prompt is
        # reused, and a rejected draft only removes the newest cells.
        cparams.swa_full = False
        cparams.n_outputs_max = self._outputs_max
        cparams.no_perf = True
        cparams.flash_attn_type = FLASH_ATTN[self._flash_attn]
        cparams.type_k = CACHE_TYPES[self._cache_types[0]]
        cparams.type_v = CACHE_TYPES[self._cache_types[1]]
        with llama_log.captured() as lines:
            ctx = ll.llama_init_from_model(model, cparams)
        self._flash_attn_in_force = llama_log.flash_attn_in_force(self._flash_attn, lines)
        if not ctx:
            ll.llama_model_free(model)
            raise ModelError("llama.cpp could not create a context (n_ctx too large for memory?)")
        self._ctx = ctx
        # split, llama.cpp rounds each slot's stream up to a multiple of 256 cells
        self._layout = KvLayout(int(ll.llama_n_ctx(ctx)), self._n_parallel, self._kv_unified)
        self._pools = threadpool.attach(ctx, self._n_threads, self._n_threads_batch)
        self._mem = ll.llama_get_memory(ctx)
        self._vocab = ll.llama_model_get_vocab(model)
        self._n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
        self._eog = [t for t in range(self._n_vocab) if ll.llama_vocab_is_eog(self._vocab, t)]
        self._eog_set = frozenset(self._eog)
        self._tokenizer = LlamaTokenizer(self._vocab)
        self._piece = self._tokenizer.piece

        batch = ll.llama_batch_init(self._n_batch, 0, 1)
        self._batch = batch
        self._b_token = batch.token
        self._b_pos = batch.pos
        self._b_logits = batch.logits
        n_seq_id = batch.n_seq_id
        self._b_seq = [batch.seq_id[i] for i in range(self._n_batch)]
        for i in range(self._n_batch):
            n_seq_id[i] = 1

        self._scheduler: Admission[_Job] = Admission(self._n_parallel, self._layout.n_ctx)
        self._active: list[_Active] = []
        self._seen_cancel_epoch = 0
        self._marker_tokens = len(self._tokenizer.tokenize(ASSISTANT_MARK, add_special=False))
        self._min_constrained_tokens = self._marker_tokens + ANSWER_RESERVE + 4
        self._constrained = ConstrainedSampler(ctx, self._n_vocab)
        self._cost = StepCost()  # measured before serving, refined by every step
        self._acceptance = Acceptance(self._spec.ngram_max)
        # a repeatable request run alone is planned against this, never against the measured
        self._fixed_cost = StepCost.fixed(STEEP_ROW_COST)
        self._sample_seconds = 0.0  # moving average per sampled token
        self._n_sampled = 0
        build = read_build_info()
        log.info("llama.cpp build: %s", build.summary())
        if build.has_amx:
            log.warning(
                "this llama.cpp build uses AMX kernels, which crash (SIGILL) on some hosts "
                "that report AMX; if this process dies in the warm-up below, reinstall "
                "without them: `make` (tools/llama_build.py) leaves them out unless "
                "LLAMA_ALLOW_AMX=1"
            )
        self._warm_up()
        if self._spec.enabled:
            self._calibrate()
        self._info = engine_info(
            model, ctx, model_name=self._model_name, model_path=self._model_path,
            n_parallel=self._n_parallel, n_gpu_layers=self._n_gpu_layers, build=build,
            flash_attn=self._flash_attn_in_force, cache_types=self._cache_types,
            speculation=self._spec, layout=self._layout,
        )

    @property
    def _outputs_max(self) -> int:
        """The most rows with logits in one batch: each slot's sampled token and, when
        drafting, its draft (a prompt has one, at its last token, in its request's slot).

        llama.cpp sizes its worst-case compute buffer by this, as llama-server sets it: the
        output layer over that many rows. Its default is n_batch rows: at 512, a compute
        buffer of 514 MiB on Gemma 3 (262,144 logits a row) against 21 MiB for 4 slots. A
        batch with more rows with logits than this aborts the process, so every batch stays
        within it.
        """
        per_slot = 1 + self._spec.draft_max if self._spec.enabled else 1
        return min(self._n_batch, self._n_parallel * per_slot)

    def _warm_up(self) -> None:
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
        for i, token in enumerate(tokens):
            self._b_token[i] = token
            self._b_pos[i] = i
            self._b_seq[i][0] = 0
            self._b_logits[i] = 0
        self._b_logits[len(tokens) - 1] = 1
        self._batch.n_tokens = len(tokens)
        log.info("warm-up: decoding %d tokens once before serving", len(tokens))
        rc = ll.llama_decode(self._ctx, self._batch)
        ll.llama_synchronize(self._ctx)
        ll.llama_memory_clear(self._mem, True)
        if rc != 0:
            raise ModelError(f"the warm-up decode failed (llama_decode returned {rc})")
        log.info("warm-up done in %.2f s", time.perf_counter() - started)

    def _calibrate(self) -> None:
        """Time decode steps of 1, 2, 4, ... rows with logits at each, as drafts have them:
        the median of a few interleaved rounds is the first estimate of what verifying a
        draft costs (refined by every step after)."""
        started = time.perf_counter()
        sizes = []
        rows = 1
        while rows <= min(self._outputs_max, _CALIBRATE_ROWS):
            sizes.append(rows)
            rows *= 2
        timings: dict[int, list[float]] = {rows: [] for rows in sizes}
        for _ in range(_CALIBRATE_ROUNDS):
            for rows in sizes:
                for i in range(rows):
                    self._b_token[i] = 0
                    self._b_pos[i] = i
                    self._b_seq[i][0] = 0
                    self._b_logits[i] = 1
                self._batch.n_tokens = rows
                t0 = time.perf_counter()
                rc = ll.llama_decode(self._ctx, self._batch)
                ll.llama_synchronize(self._ctx)
                timings[rows].append(time.perf_counter() - t0)
                ll.llama_memory_clear(self._mem, True)
                if rc != 0:
                    raise ModelError(f"a calibration decode failed (llama_decode returned {rc})")
        for i in range(self._n_batch):
            self._b_logits[i] = 0
        for rows, seconds in timings.items():
            self._cost.set(rows, statistics.median(seconds))
        log.info(
            "speculation: step time by batch rows measured in %.2f s (%s)",
            time.perf_counter() - started,
            ", ".join(f"{r}: {self._cost.estimate(r) * 1000:.1f} ms" for r in sizes),
        )

    def _free(self) -> None:
        for active in self._active:
            for seq in active.seqs:
                self._free_samplers(seq)
        self._active.clear()
        if getattr(self, "_batch", None) is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            threadpool.detach(self._ctx)
            ll.llama_free(self._ctx)
            self._ctx = None
        pools = getattr(self, "_pools", None)
        if pools is not None:
            pools.close()
            self._pools = None
        if getattr(self, "_model", None):
            ll.llama_model_free(self._model)
            self._model = None

    # -- the step loop

    def _loop(self) -> None:
        while True:
            with self._wake:
                # with nothing running, any pending request can be admitted: no wait then
                while not (
                    self._inbox or self._closing or self._active or self._scheduler.waiting
                ):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                closing = self._closing
                epoch = self._cancel_epoch
            if closing:
                self._shutdown(inbox)
                return
            for job in inbox:
                self._accept(job)
            if epoch != self._seen_cancel_epoch:
                self._seen_cancel_epoch = epoch
                self._drop_cancelled()
            self._admit()
            if not self._kv_unified and self._scheduler.has_gap:
                self._close_gaps()
            if self._active:
                self._step()

    def _accept(self, job: _Job) -> None:
        """Queue a new job (its prompt was fitted before it came here)."""
        if job.cancelled:
            with self._lock:
                self._n_waiting -= 1
            return
        request = job.request
        self._scheduler.enqueue(Ticket(
            job, generations=request.num_generations, prompt_cells=len(job.prompt.tokens),
            cells_per_generation=request.sampling.max_tokens,
        ))

    def _drop_cancelled(self) -> None:
        dropped = self._scheduler.drop(lambda ticket: ticket.item.cancelled)
        if dropped:
            with self._lock:
                self._n_waiting -= len(dropped)
        for active in [a for a in self._active if a.job.cancelled]:
            for seq in active.seqs:
                if seq.finish is None:
                    seq.finish = FinishReason.CANCELLED
                    self._release_seq(active, seq)
            self._complete(active)

    def _admit(self) -> None:
        for ticket in self._scheduler.admit():
            with self._lock:
                self._n_waiting -= 1
            try:
                self._start(ticket)
            except BaseException as exc:
                self._scheduler.release_all(ticket)
                ticket.item.send(exc)

    def _close_gaps(self) -> None:
        """Move sequences from the highest busy slots into lower free ones.

        With a stream per slot, llama.cpp decodes one run of consecutive slots per pass over
        the weights, and a free slot below busy ones (a generation ended, and nothing that
        waits could take its slot) splits every step in two until it is filled. A move costs
        a copy of one stream at the next decode, too little to time on a CPU (14 decoding
        rows took 88 ms with one and without, Gemma 3 270M). Prefilling requests move too:
        when documents end one after another and the next arrive just after, each new one
        prefills on the top slot, and a gap below it would last its whole prefill.
        """
        movable = sorted(
            (
                (seq.seq_id, active, seq)
                for active in self._active
                for seq in active.seqs
                if seq.finish is None and seq.seq_id >= 0
            ),
            key=lambda entry: entry[0],
            reverse=True,
        )
        for slot, active, seq in movable:
            lower = self._scheduler.move_down(active.ticket, slot)
            if lower is None:
                return
            ll.llama_memory_seq_cp(self._mem, slot, lower, -1, -1)
            ll.llama_memory_seq_rm(self._mem, slot, -1, -1)
            seq.seq_id = lower

    def _start(self, ticket: Ticket[_Job]) -> None:
        job = ticket.item
        request = job.request
        sampling = request.sampling
        seed = sampling.seed
        if seed is None:
            seed = self._default_seed if self._default_seed is not None else random.getrandbits(32)
        # ignore_eos (benchmarks) means exactly max_tokens: no end of sequence, no stop strings
        stops = () if sampling.ignore_eos else (self._format.stop, *sampling.stop)
        banned = self._eog if sampling.ignore_eos else ()
        grammar = request.grammar or (GENSTRUCT_GBNF if request.constrained else None)
        seqs: list[_Seq] = []
        ngram_max = self._spec.ngram_max
        try:
            for i in range(request.num_generations):
                seq = _Seq(
                    index=i, seq_id=-1, chain=None, assembler=TextAssembler(stops),
                    max_tokens=sampling.max_tokens, constrained=request.constrained,
                    history=None if job.ngrams is None else History(job.ngrams, ngram_max),
                )
                seqs.append(seq)
                seq.chain = build_chain(
                    self._vocab, self._n_vocab, sampling, seed + i, banned=banned
                )
                if grammar is not None:
                    seq.grammar = build_grammar(self._vocab, grammar)
                else:
                    seq.greedy = is_plain_greedy(sampling, banned=banned)
        except BaseException:
            for seq in seqs:
                self._free_samplers(seq)
            raise
        for seq, slot in zip(seqs, ticket.slots, strict=True):
            seq.seq_id = slot
            ll.llama_memory_seq_rm(self._mem, slot, -1, -1)
        with self._lock:
            self._busy += len(seqs)
        self._active.append(
            _Active(
                job=job, ticket=ticket, tokens=job.prompt.tokens,
                truncated=job.prompt.truncated, admitted=time.perf_counter(), seqs=seqs,
                stream=request.stream,
                repeatable=sampling.temperature <= 0 or sampling.seed is not None,
                seeded_sampled=sampling.temperature > 0 and sampling.seed is not None,
            )
        )

    def _plan_drafts(self) -> None:
        """Give this step's drafts to the sequences where verifying them pays (speculation.py).

        A sequence drafts when it feeds one sampled token (not forced ones) and has at least
        two tokens of budget left; its draft never takes rows a prompt chunk needs.
        """
        spec = self._spec
        generating = rows = prefill = 0
        found: list[tuple[_Seq, Draft]] = []
        alone = len(self._active) == 1
        for active in self._active:
            if active.n_prefilled < len(active.tokens):
                prefill += len(active.tokens) - active.n_prefilled
                continue
            # a seeded sampled request beside others is not drafted: on the CPUs measured,
            # drafts of sampled text at 8 to 16 in flight saved nothing, and they would tie
            # its text to what else runs
            undrafted = spec.mode == "auto" and active.seeded_sampled and not alone
            for seq in active.seqs:
                if seq.finish is not None or not seq.feed:
                    continue
                generating += 1
                rows += len(seq.feed)
                if len(seq.feed) != 1 or seq.history is None or undrafted:
                    continue
                budget = seq.max_tokens - seq.n_generated - 1  # the last token is sampled
                draft = seq.history.draft(min(spec.draft_max, budget))
                if draft is not None:
                    found.append((seq, draft))
        if not found:
            return
        if spec.mode == "always":
            free = rows_left(rows, prefill, self._n_batch)
            for seq, draft in found:
                seq.draft = draft.tokens[: max(free, 0)]
                seq.draft_match = draft.match
                free -= len(seq.draft)
            return
        if alone and self._active[0].repeatable:
            # alone, its batches are its own: plan them from the request alone, so that every
            # run of it drafts alike (speculation.py)
            rate, cost, sample_seconds = self._acceptance.own_rate, self._fixed_cost, 0.0
        else:
            rate, cost, sample_seconds = self._acceptance.rate, self._cost, self._sample_seconds
        take = plan_drafts(
            [
                Candidate(rate(d.match, s.spec_accepted, s.spec_compared), len(d.tokens))
                for s, d in found
            ],
            generating=generating, decode_rows=rows, prompt_rows=prefill,
            batch_rows=self._n_batch,
            cost=cost, sample_seconds=sample_seconds,
        )
        for (seq, draft), k in zip(found, take, strict=True):
            if k:
                seq.draft = draft.tokens[:k]
                seq.draft_match = draft.match

    def _step(self) -> None:
        cap = self._n_batch
        speculating = self._spec.enabled
        if speculating:
            self._plan_drafts()
        # What each slot feeds this step, decided in admission order: one token (or a few
        # forced ones) and its draft for every generating sequence, then prompt chunks for
        # requests still prefilling, first admitted first. (slot, request, its sequence or
        # None for a prompt chunk, rows)
        parts: list[tuple[int, _Active, _Seq | None, int]] = []
        n = 0
        for active in self._active:
            active.in_batch = False
            active.prefill_row = -1
            if active.n_prefilled < len(active.tokens):
                continue
            for seq in active.seqs:
                seq.out_row = -1
                if seq.finish is not None or not seq.feed:
                    continue
                rows = 1 + len(seq.draft) if seq.draft else min(len(seq.feed), cap - n)
                if rows:
                    parts.append((seq.seq_id, active, seq, rows))
                    n += rows
        decoding_rows = n
        for active in self._active:
            left = len(active.tokens) - active.n_prefilled
            if left > 0 and n < cap:
                take = min(left, cap - n)
                parts.append((active.seqs[0].seq_id, active, None, take))
                n += take
        # Written in slot order: a split KV cache computes a run of consecutive slots in one
        # ubatch, and starts another wherever the next row's slot is not the next one.
        parts.sort(key=lambda part: part[0])
        n = 0
        for sid, active, fed, rows in parts:
            active.in_batch = True
            n = self._put_prompt(active, sid, rows, n) if fed is None else self._put(fed, rows, n)
        if n == 0:
            return
        self._batch.n_tokens = n
        started = time.perf_counter()
        rc = ll.llama_decode(self._ctx, self._batch)
        if speculating and rc == 0:
            ll.llama_synchronize(self._ctx)  # a GPU decodes asynchronously: time all of it
            if n == decoding_rows:  # no prompt chunk: every row had logits, as drafts do
                self._cost.observe(n, time.perf_counter() - started)
        if self._on_step is not None:
            self._on_step(n)
        if rc != 0:
            if rc == 1:
                # no room in the KV cache: fail the requests in this batch, keep the engine
                for active in [a for a in self._active if a.in_batch]:
                    self._fail_active(active, ModelError("the KV cache is full; retry later"))
                return
            raise RuntimeError(f"llama_decode returned {rc}")
        now = time.perf_counter()
        sample = self._sample
        self._n_sampled = 0
        for active in self._active:
            if active.prefill_row >= 0:
                row = active.prefill_row
                first = active.seqs[0]
                total = len(active.tokens)
                # copy the prompt to every sequence before any samples: a generation that
                # ends on its first token frees its sequence, and the first is the source
                for seq in active.seqs:
                    if seq is not first:
                        ll.llama_memory_seq_cp(self._mem, first.seq_id, seq.seq_id, -1, -1)
                    seq.pos = total
                for seq in active.seqs:
                    self._accept_token(active, seq, sample(seq, row))
                active.first_token = now
            else:
                for seq in active.seqs:
                    if seq.out_row < 0 or seq.finish is not None:
                        continue
                    if seq.draft:
                        self._verify(active, seq)
                    else:
                        self._accept_token(active, seq, sample(seq, seq.out_row))
        if speculating and self._n_sampled:
            per_token = (time.perf_counter() - now) / self._n_sampled
            self._sample_seconds += 0.2 * (per_token - self._sample_seconds)
        finished = []
        for active in self._active:
            if active.done == len(active.seqs):
                finished.append(active)
            elif active.deltas:
                active.job.send(active.deltas)
                active.deltas = []
        for active in finished:
            self._complete(active)

    def _put(self, seq: _Seq, rows: int, n: int) -> int:
        """A sequence's rows from batch row `n` on: its sampled token and draft (logits at
        every row, planned to fit), or `rows` of its feed. Returns the next free row."""
        b_token, b_pos, b_logits, b_seq = self._b_token, self._b_pos, self._b_logits, self._b_seq
        sid, pos, feed = seq.seq_id, seq.pos, seq.feed
        if seq.draft:
            seq.out_row = n
            for j, token in enumerate((feed[0], *seq.draft)):
                b_token[n + j] = token
                b_pos[n + j] = pos + j
                b_seq[n + j][0] = sid
                b_logits[n + j] = 1
            feed.clear()
        else:
            for j in range(rows):
                b_token[n + j] = feed[j]
                b_pos[n + j] = pos + j
                b_seq[n + j][0] = sid
                b_logits[n + j] = 0
            del feed[:rows]
            if not feed:
                b_logits[n + rows - 1] = 1
                seq.out_row = n + rows - 1
        seq.pos = pos + rows
        return n + rows

    def _put_prompt(self, active: _Active, sid: int, rows: int, n: int) -> int:
        """The next `rows` prompt tokens of a prefilling request from batch row `n` on, with
        logits at its last prompt token. Returns the next free row."""
        b_token, b_pos, b_logits, b_seq = self._b_token, self._b_pos, self._b_logits, self._b_seq
        done, tokens = active.n_prefilled, active.tokens
        for j in range(done, done + rows):
            b_token[n] = tokens[j]
            b_pos[n] = j
            b_seq[n][0] = sid
            b_logits[n] = 0
            n += 1
        active.n_prefilled = done + rows
        if done + rows == len(tokens):
            b_logits[n - 1] = 1
            active.prefill_row = n - 1
        return n

    def _verify(self, active: _Active, seq: _Seq) -> None:
        """Sample at the fed token's row and at each drafted row while the draft agrees.

        Every sample is the sequence's own chain on the logits after the tokens accepted so
        far, so the text is what decoding one token per step gives. The KV cells of the
        rejected tail are removed; the first token that differed is fed next step.
        """
        draft = seq.draft
        k = len(draft)
        first = seq.pos - k - 1  # the fed token's position
        accepted = 0
        for i in range(k + 1):
            token = self._sample(seq, seq.out_row + i)
            hit = i < k and token == draft[i]
            accepted += hit
            self._accept_token(active, seq, token)
            # a miss, the end of the generation, or forced tokens (constrained mode) queued
            # behind this one: the draft's later rows no longer follow the sequence
            if not hit or seq.finish is not None or len(seq.feed) != i + 1:
                break
        self._acceptance.record(seq.draft_match, k, accepted)
        seq.spec_accepted += accepted
        seq.spec_compared += compared(k, accepted)
        active.drafted += k
        active.accepted += accepted
        seq.draft = []
        if seq.finish is not None:
            return  # its cells are gone already
        del seq.feed[:accepted]  # in the cache already
        seq.pos = first + 1 + accepted
        if accepted < k:
            ll.llama_memory_seq_rm(self._mem, seq.seq_id, seq.pos, -1)

    def _accept_token(self, active: _Active, seq: _Seq, token: int) -> None:
        """Take one sampled token: text out, stop checks, the next feed."""
        if token in self._eog_set:
            self._finish(active, seq, FinishReason.EOS)
            return
        seq.n_generated += 1
        if seq.history is not None:
            seq.history.append(token)
        piece = self._piece(token)
        text = seq.assembler.push(piece)
        if text:
            _emit(active, seq.index, text)
        if seq.assembler.stopped:
            self._finish(active, seq, FinishReason.STOP)
            return
        if seq.n_generated >= seq.max_tokens:
            self._finish(active, seq, FinishReason.LENGTH)
            return
        seq.feed.append(token)
        if seq.constrained:
            self._track_marker(active, seq, piece)

    def _track_marker(self, active: _Active, seq: _Seq, piece: bytes) -> None:
        """Constrained mode: force the rest of `[[[Assistant]]]` when the budget runs low."""
        if seq.marker is None:
            at = piece.find(b"[")
            if at == -1:
                if not seq.question_visible and piece.strip():
                    seq.question_visible = True
            else:
                seq.question_visible = seq.question_visible or bool(piece[:at].strip())
                seq.marker = piece[at:]
        elif len(seq.marker) < len(_ASSISTANT_BYTES):
            seq.marker += piece
        if seq.marker is not None and len(seq.marker) >= len(_ASSISTANT_BYTES):
            return
        remaining = seq.max_tokens - seq.n_generated
        if remaining > 2 * self._marker_tokens + ANSWER_RESERVE:
            return
        if not seq.question_visible or seq.assembler.mid_character:
            return
        rest = ASSISTANT_MARK[len(seq.marker or b"") :]
        forced = self._tokenizer.tokenize(rest, add_special=False)
        if remaining - len(forced) > ANSWER_RESERVE:
            return
        for token in forced:
            ll.llama_sampler_accept(seq.chain, token)
            ll.llama_sampler_accept(seq.grammar, token)
            seq.n_generated += 1
            if seq.history is not None:
                seq.history.append(token)
            text = seq.assembler.push(self._piece(token))
            if text:
                _emit(active, seq.index, text)
        seq.feed.extend(forced)
        seq.marker = _ASSISTANT_BYTES
        if seq.assembler.stopped:
            self._finish(active, seq, FinishReason.STOP)
        elif seq.n_generated >= seq.max_tokens:
            self._finish(active, seq, FinishReason.LENGTH)

    def _finish(self, active: _Active, seq: _Seq, reason: FinishReason) -> None:
        seq.finish = reason
        if reason is not FinishReason.STOP:
            tail = seq.assembler.finish()
            if tail:
                _emit(active, seq.index, tail)
        if not active.first_token:
            active.first_token = time.perf_counter()
        active.done += 1
        self._release_seq(active, seq)

    def _release_seq(self, active: _Active, seq: _Seq) -> None:
        if seq.seq_id >= 0:
            ll.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
            self._scheduler.release(active.ticket, seq.seq_id)  # its slot and KV share back
            seq.seq_id = -1
            with self._lock:
                self._busy -= 1
        self._free_samplers(seq)
        seq.feed.clear()
        seq.out_row = -1

    @staticmethod
    def _free_samplers(seq: _Seq) -> None:
        if seq.chain:
            ll.llama_sampler_free(seq.chain)
            seq.chain = None
        if seq.grammar:
            ll.llama_sampler_free(seq.grammar)
            seq.grammar = None

    def _sample(self, seq: _Seq, row: int) -> int:
        self._n_sampled += 1
        if seq.greedy:
            return greedy_token(self._ctx, row, self._n_vocab)
        if seq.grammar is None:
            return int(ll.llama_sampler_sample(seq.chain, self._ctx, row))
        return self._constrained.sample(seq.chain, seq.grammar, row)

    def _complete(self, active: _Active) -> None:
        """Send the last event of a request and give back its reservation."""
        for seq in active.seqs:
            if seq.finish is None:
                seq.finish = FinishReason.CANCELLED
            self._release_seq(active, seq)
        self._active.remove(active)
        now = time.perf_counter()
        submitted = active.job.submitted
        events: list[EngineEvent] = [*active.deltas]
        events.append(
            Completed(
                generations=tuple(
                    Generation(
                        index=s.index,
                        text=s.assembler.text,
                        finish_reason=s.finish or FinishReason.CANCELLED,
                        completion_tokens=s.n_generated,
                    )
                    for s in active.seqs
                ),
                prompt_tokens=len(active.tokens),
                truncated=active.truncated,
                draft_tokens=active.drafted,
                accepted_draft_tokens=active.accepted,
                timings=Timings(
                    queue_seconds=active.admitted - submitted,
                    first_token_seconds=(active.first_token or now) - submitted,
                    total_seconds=now - submitted,
                ),
            )
        )
        active.deltas = []
        if not active.job.cancelled:
            active.job.send(events)

    def _fail_active(self, active: _Active, error: BaseException) -> None:
        for seq in active.seqs:
            seq.finish = seq.finish or FinishReason.CANCELLED
            self._release_seq(active, seq)
        self._active.remove(active)
        active.job.send(error)

    def _shutdown(self, inbox: list[_Job]) -> None:
        for active in list(self._active):
            self._complete(active)
        unavailable = "the engine is shutting down"
        for job in inbox:
            job.send(Unavailable(unavailable))
        waiting = self._scheduler.drain()
        for ticket in waiting:
            ticket.item.send(Unavailable(unavailable))
        with self._lock:
            self._n_waiting -= len(inbox) + len(waiting)

    def _fail_everything(self, error: ModelError) -> None:
        for active in list(getattr(self, "_active", [])):
            with contextlib.suppress(Exception):
                self._fail_active(active, ModelError(str(error)))
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for job in inbox:
            job.send(ModelError(str(error)))
        scheduler: Admission[_Job] | None = getattr(self, "_scheduler", None)
        for ticket in scheduler.drain() if scheduler is not None else ():
            ticket.item.send(ModelError(str(error)))
