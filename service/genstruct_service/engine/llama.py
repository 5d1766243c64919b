"""`LlamaEngine`: continuous batching over llama.cpp's low-level API on one engine thread.

The asyncio side (this module): requests are checked, their prompts rendered, tokenized and
fitted on a worker thread (engine/fitting.py), and handed to the engine thread through the
inbox (engine/inbox.py); events come back through `loop.call_soon_threadsafe`: the final
result only, or for a streaming request one message per step with that step's text.

The engine thread (engine/loop.py) repeats one step, as vLLM V1's engine core does: take the
inbox, `schedule` (engine/scheduler.py: admission, slot moves, drafts, the batch) returns a
`StepPlan`, the runner `execute`s it (engine/backend/runner.py, the only part that touches
llama.cpp), and `update` (engine/update.py) samples, changes the requests (engine/request.py,
engine/sequence.py) and sends their events.

Slots and sequences. A slot is one llama.cpp sequence id (0 <= id < n_parallel,
`n_seq_max = n_parallel`). A request with `num_generations = n` takes n slots at once: its
prompt is prefilled on the first, copied to the other n - 1 with `llama_memory_seq_cp`,
and every slot samples its first token from the same last-prompt logits with its own
sampler (seed + i). So `n_parallel` bounds the number of sequences decoded together,
whatever the mix of requests, and a request may ask for at most `n_parallel` generations.

The KV cache (engine/fitting.py's KvLayout). Split, the default as in llama-server: every
slot has a stream of `n_ctx / n_parallel` cells, and attention reads a sequence's own
stream only; the prompt's copy to another slot copies the stream, and so does moving a
generation into a lower free slot, which keeps the busy slots one run (the scheduler's
moves). Unified (`kv_unified`): one pool, where one long document may use most of the
context and the copy shares cells. Its price: CPU flash attention works on 64-row tiles of
the batch and skips only the cells masked for every row of a tile, so a step that mixes
sequences reads every cell in use. On 2 CPU cores, 15 decoding rows beside a 200-token
prompt chunk took 1.9x as long unified as split (Gemma 3 270M; 1.5x with Genstruct-7B's
layers).

Admission (engine/admission.py). A request reserves `prompt_tokens + n * max_tokens` KV
cells, which bounds what it can ever use, and starts when it has n slots and its cells; a
smaller request may go past one that does not fit yet, a bounded number of times. A
request that could not fit even in an empty engine is refused with ContextOverflow, or its
content cut to fit with Truncation.TRUNCATE (engine/fitting.py). Split, each generation's
slot holds the prompt and its max_tokens, so fitting bounds it and free slots are all
admission needs. Waiting requests are bounded by `max_queue` (QueueFull beyond).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from genstruct_service.engine.backend.gguf_info import engine_info
from genstruct_service.engine.backend.model import (
    CACHE_TYPES,
    FLASH_ATTN,
    ContextSettings,
    LoadedModel,
    load,
)
from genstruct_service.engine.backend.runner import Runner
from genstruct_service.engine.backend.tokenizer import LlamaTokenizer
from genstruct_service.engine.cpus import available_cpus
from genstruct_service.engine.drafts import DraftChooser
from genstruct_service.engine.fitting import FittedPrompt, KvLayout, content_budget, fit_prompt
from genstruct_service.engine.inbox import Inbox
from genstruct_service.engine.loop import EngineLoop
from genstruct_service.engine.ngrams import History, PromptNgrams
from genstruct_service.engine.request import Job, Request
from genstruct_service.engine.scheduler import StepScheduler
from genstruct_service.engine.sequence import AnswerMarker, Sequence
from genstruct_service.engine.speculation import SpeculationSettings
from genstruct_service.engine.step_cost import BatchShape, calibration_rows
from genstruct_service.engine.types import (
    Completed,
    EngineEvent,
    EngineInfo,
    EngineStats,
    GenerationRequest,
    PromptFormat,
    Truncation,
    sampling_problem,
)
from genstruct_service.engine.update import Updater
from genstruct_service.errors import InvalidRequest, ModelError

log = logging.getLogger(__name__)

DEFAULT_UBATCH = 512  # llama-server's


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
        n_threads = n_threads or available_cpus()
        # The most rows with logits in one batch: each slot's sampled token and, when
        # drafting, its draft (a prompt has one, at its last token, in its request's slot).
        per_slot = 1 + speculation.draft_max if speculation.enabled else 1
        self._settings = ContextSettings(
            model_path=str(model_path), n_ctx=n_ctx, n_batch=n_batch,
            n_ubatch=min(n_ubatch or DEFAULT_UBATCH, n_batch), n_parallel=n_parallel,
            n_gpu_layers=n_gpu_layers, n_threads=n_threads,
            n_threads_batch=n_threads_batch or n_threads, flash_attn=flash_attn,
            cache_types=(cache_type_k, cache_type_v), kv_unified=kv_unified,
            n_outputs_max=min(n_batch, n_parallel * per_slot),
        )
        self._model_name = model_name or Path(model_path).stem
        self._format = prompt_format
        self._n_parallel = n_parallel
        self._spec = speculation
        self._default_seed = default_seed
        self._on_step = on_step
        self._inbox = Inbox(max_queue=max_queue, n_parallel=n_parallel)
        # set on the engine thread before `_ready`, and read-only from then on
        self._runner: Runner | None = None
        self._drafts: DraftChooser | None = None  # what it learned of drafts, when speculating
        self._layout = KvLayout(n_ctx, n_parallel, kv_unified)
        self._info: EngineInfo | None = None
        self._step_costs: dict[int, float] = {}  # timed before serving, when speculating
        self._min_constrained_tokens = 0
        self._marker_tokens = 0
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
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

    @property
    def _tokenizer(self) -> LlamaTokenizer:
        assert self._runner is not None  # set before the constructor returns
        return self._runner.tokenizer

    def step_costs(self) -> dict[int, float]:
        """Seconds of a decode step by batch rows, as timed before serving (empty without
        speculation): the curve the draft planner started from."""
        return dict(self._step_costs)

    def stats(self) -> EngineStats:
        busy, queued = self._inbox.counts()
        return EngineStats(busy_slots=busy, queued=queued, n_parallel=self._n_parallel)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.tokenize(text, add_special=False))

    def content_budget(self, request: GenerationRequest) -> int:
        return content_budget(self._tokenizer, self._format, request, layout=self._layout)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        self._validate(request)
        self._inbox.check_open()
        # rendering and tokenizing a long document takes a while: not on the engine thread
        prompt, ngrams = await asyncio.to_thread(self._prepare, request)
        job = Job(request, prompt, ngrams, asyncio.get_running_loop())
        self._inbox.submit(job)
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    job.answered = True
                    raise item
                for event in item:
                    if isinstance(event, Completed):
                        job.answered = True
                    yield event
                if job.answered:
                    return
        finally:
            if not job.answered:
                self._inbox.cancel(job)

    async def close(self) -> None:
        self._inbox.close()
        await asyncio.to_thread(self._thread.join)

    async def wait_failed(self) -> BaseException:
        return await self._inbox.wait_failed()

    def _prepare(self, request: GenerationRequest) -> tuple[FittedPrompt, PromptNgrams | None]:
        """The prompt's ids and their n-gram index (on a worker thread)."""
        prompt = fit_prompt(self._tokenizer, self._format, request, layout=self._layout)
        if not self._spec.enabled:
            return prompt, None
        return prompt, PromptNgrams(prompt.tokens, self._spec.ngram_min)

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
        if request.constrained and self._format.grammar is None:
            raise InvalidRequest("constrained", "this prompt format has no grammar")
        if request.constrained and s.max_tokens < self._min_constrained_tokens:
            raise InvalidRequest(
                "sampling.max_tokens",
                f"constrained output needs at least {self._min_constrained_tokens} tokens, "
                f"got {s.max_tokens}",
            )

    # ---------------------------------------------------------------- engine thread

    def _thread_main(self) -> None:
        try:
            loaded = load(self._settings)
        except BaseException as exc:
            self._fail_to_load(exc)
            return
        try:
            runner = Runner(loaded, self._settings.n_batch)
        except BaseException as exc:
            loaded.free()
            self._fail_to_load(exc)
            return
        try:
            loop = self._start(loaded, runner)
        except BaseException as exc:
            runner.close()
            self._fail_to_load(exc)
            return
        self._ready.set()
        try:
            loop.run()
        finally:
            runner.close()

    def _fail_to_load(self, exc: BaseException) -> None:
        self._load_error = (
            exc if isinstance(exc, ModelError) else ModelError(f"cannot load model: {exc}")
        )
        self._ready.set()

    def _start(self, loaded: LoadedModel, runner: Runner) -> EngineLoop:
        """Everything the loop needs, once the model is loaded: warmed up and, with
        speculation, its step costs measured."""
        settings, spec = self._settings, self._spec
        self._runner = runner
        self._layout = loaded.layout
        marker = self._format.answer_marker
        self._marker_tokens = len(runner.tokenizer.tokenize(marker, add_special=False))
        self._min_constrained_tokens = self._marker_tokens + self._format.answer_reserve + 4
        info = self._info = engine_info(
            loaded.model, loaded.ctx, model_name=self._model_name,
            model_path=settings.model_path, n_parallel=settings.n_parallel,
            n_gpu_layers=settings.n_gpu_layers, build=loaded.build,
            flash_attn=loaded.flash_attn, cache_types=settings.cache_types,
            speculation=spec, layout=loaded.layout,
        )
        shape = BatchShape(split=not settings.kv_unified, n_ubatch=settings.n_ubatch)
        # every layer on a GPU: a repeatable request alone is planned on a GPU's row costs
        offloaded = info.gpu_layers_offloaded == info.total_layers > 0
        drafts = (
            DraftChooser(spec, settings.n_batch, shape, offloaded=offloaded)
            if spec.enabled else None
        )  # fmt: skip
        self._drafts = drafts
        scheduler = StepScheduler(
            settings.n_parallel, loaded.layout.n_ctx, n_batch=settings.n_batch,
            split_kv=not settings.kv_unified, drafts=drafts,
        )
        runner.warm_up()
        if drafts is not None:
            started = time.perf_counter()
            measured = runner.calibrate(calibration_rows(spec.draft_max, settings.n_outputs_max))
            for rows, seconds in measured.items():
                drafts.cost.set(rows, seconds)
            self._step_costs = measured
            log.info(
                "speculation: step time by batch rows measured in %.2f s (%s); a greedy or "
                "seeded request alone is planned on a %s's row costs",
                time.perf_counter() - started,
                ", ".join(f"{r}: {drafts.cost.estimate(r) * 1000:.1f} ms" for r in measured),
                "GPU" if offloaded else "CPU",
            )
        updater = Updater(scheduler, self._inbox, drafts)
        return EngineLoop(self._inbox, scheduler, runner, updater,
                          make_request=self._make_request, on_step=self._on_step)  # fmt: skip

    def _make_request(self, job: Job) -> Request:
        """A job's sequences, each with its sampler (seed + its index)."""
        assert self._runner is not None
        request, fmt, runner = job.request, self._format, self._runner
        sampling = request.sampling
        seed = sampling.seed
        if seed is None:
            seed = self._default_seed if self._default_seed is not None else random.getrandbits(32)
        # ignore_eos (benchmarks) means exactly max_tokens: no end of sequence, no stop strings
        stops = () if sampling.ignore_eos else (fmt.stop, *sampling.stop)
        banned = runner.tokenizer.eog_tokens if sampling.ignore_eos else ()
        grammar = request.grammar or (fmt.grammar if request.constrained else None)
        ngram_max, marker_tokens = self._spec.ngram_max, self._marker_tokens
        seqs: list[Sequence] = []
        try:
            for i in range(request.num_generations):
                sampler = runner.sampler(sampling, seed + i, grammar=grammar, banned=banned)
                history = None if job.ngrams is None else History(job.ngrams, ngram_max)
                marker = None
                if request.constrained and fmt.answer_marker:
                    marker = AnswerMarker(fmt.answer_marker, fmt.answer_reserve, marker_tokens)
                seqs.append(Sequence(
                    i, sampler, runner.tokenizer, stops=stops, max_tokens=sampling.max_tokens,
                    stream=request.stream, history=history, marker=marker,
                ))  # fmt: skip
        except BaseException:
            for seq in seqs:
                seq.sampler.close()
            raise
        History.share([seq.history for seq in seqs if seq.history is not None])
        return Request(job, seqs)
