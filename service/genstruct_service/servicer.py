"""The GenstructService servicer: protobuf requests in, engine work, protobuf responses out."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc

from . import __version__
from .chunking import MIN_PART_TOKENS, Chunk, TooManyParts, split
from .config import Settings
from .engine.types import (
    Completed,
    Engine,
    EngineEvent,
    GenerationRequest,
    TokenDelta,
    Truncation,
)
from .errors import (
    ContextOverflow,
    DocumentTimeout,
    Draining,
    GenstructError,
    InvalidRequest,
    Loading,
    QueueFull,
    Reason,
    TooManyChunks,
)
from .interceptors import current_call
from .metrics import Metrics
from .preparation import PreparePool
from .responses import (
    Chunked,
    add_grounding,
    build_message,
    error_response,
    speculation_message,
    to_response,
)
from .status import code_of, error_status, internal_status
from .validation import default_sampling, limits, to_generation_request

log = logging.getLogger("genstruct_service.servicer")

Context = grpc.aio.ServicerContext[Any, Any]

# The RetryInfo a refusal carries stays within these bounds (seconds).
MIN_RETRY_DELAY = 0.05
MAX_RETRY_DELAY = 60.0


class ServiceState:
    """Whether the service takes work (loading, serving, draining) and how much is in flight."""

    def __init__(
        self,
        engine: Engine | None = None,
        max_documents: int | None = None,
        max_per_connection: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        # whether the engine serves a stand-in model (the demo), not Genstruct-7B itself
        self.stand_in = False
        self.draining = False
        self._clock = clock
        self._drain_ends: float | None = None  # clock() when the drain's time is up
        # the time between two documents' answers while others were held (moving average),
        # and when the last one was answered with others still held: a refused caller's
        # expected wait for room
        self._answer_gap: float | None = None
        self._last_answer: float | None = None
        # documents held from their arrival to their answer, whatever step they are at
        # (validation, tokenization, the engine's queue, a slot); None: no limit
        self.max_documents = max_documents
        self.documents = 0
        # and the share of them one connection (a gRPC peer) may hold, so that one bulk job
        # cannot refuse every other caller
        self.max_per_connection = max_per_connection
        self._by_peer: dict[str, int] = {}
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_listeners: set[Callable[[], None]] = set()

    @property
    def active(self) -> int:
        """RPCs doing generation work now (a GenerateBatch stream counts once)."""
        return self._active

    def ready_engine(self) -> Engine:
        """The engine, or Unavailable while the model loads or the server drains."""
        if self.draining:
            raise Draining("the server is shutting down; retry on another replica")
        if self.engine is None:
            raise Loading("the model is still loading; retry in a moment")
        return self.engine

    @contextmanager
    def work(self) -> Iterator[Engine]:
        """Admit one unit of work (refused while loading or draining); drain waits for it."""
        engine = self.ready_engine()
        self._active += 1
        self._idle.clear()
        try:
            yield engine
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def take_document(self, peer: str) -> None:
        """Count one document that arrived from connection `peer`; QueueFull when the server,
        or that connection's share of it, holds its most already.

        Counted before the document is tokenized, so requests waiting for a tokenizing thread
        are bounded too, not only those in the engine's queue. Give it back with
        `give_document`.
        """
        if self.max_documents is not None and self.documents >= self.max_documents:
            raise QueueFull(
                f"the server holds {self.documents} documents already (max_queue waiting "
                "plus n_parallel decoding); retry with backoff",
                figures={"held": self.documents, "limit": self.max_documents, "scope": "server"},
                retry_after=self._expected_wait(1),
            )
        held = self._by_peer.get(peer, 0)
        if self.max_per_connection is not None and held >= self.max_per_connection:
            raise QueueFull(
                f"this connection holds {held} documents already, its share of the server "
                "(queue_share_per_connection); retry with backoff as they finish",
                figures={"held": held, "limit": self.max_per_connection, "scope": "connection"},
                # one of this connection's documents must be answered, not any one
                retry_after=self._expected_wait(held / max(self.documents, 1)),
            )
        self.documents += 1
        self._by_peer[peer] = held + 1

    def give_document(self, peer: str) -> None:
        self.documents -= 1
        held = self._by_peer[peer] - 1
        if held:
            self._by_peer[peer] = held
        else:
            del self._by_peer[peer]
        now = self._clock()
        if self._last_answer is not None:
            gap = now - self._last_answer
            previous = self._answer_gap
            self._answer_gap = gap if previous is None else 0.8 * previous + 0.2 * gap
        # a gap that starts while nothing is held would measure idleness, not the queue
        self._last_answer = now if self.documents else None

    def _expected_wait(self, share: float) -> float | None:
        """Seconds until one document of a `share` of those held is answered (None: no
        measure yet); answers come one `_answer_gap` apart."""
        if self._answer_gap is None or share <= 0:
            return None
        return min(max(self._answer_gap / share, MIN_RETRY_DELAY), MAX_RETRY_DELAY)

    def retry_delay(self, error: GenstructError) -> float | None:
        """The wait a caller refused with `error` should keep before trying again, or None
        when the server knows no useful one (sent as RetryInfo)."""
        if error.retry_after is not None:
            return error.retry_after
        if error.reason is Reason.QUEUE_FULL:  # the engine's queue, the preparing threads
            return self._expected_wait(1)
        if error.reason is Reason.DRAINING and self._drain_ends is not None:
            left = self._drain_ends - self._clock()
            return min(max(left, MIN_RETRY_DELAY), MAX_RETRY_DELAY) if left > 0 else None
        return None

    @contextmanager
    def document(self, peer: str) -> Iterator[None]:
        """One document from its arrival to its answer (see take_document)."""
        self.take_document(peer)
        try:
            yield
        finally:
            self.give_document(peer)

    def start_draining(self, seconds: float | None = None) -> None:
        """Refuse new work from now on and tell open GenerateBatch streams to stop reading;
        the work in flight has `seconds` to finish (None: not known)."""
        self.draining = True
        if seconds is not None:
            self._drain_ends = self._clock() + seconds
        for listener in list(self._drain_listeners):
            listener()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no work is in flight, at most `timeout` seconds; True when idle."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @contextmanager
    def drain_listener(self, listener: Callable[[], None]) -> Iterator[None]:
        self._drain_listeners.add(listener)
        try:
            yield
        finally:
            self._drain_listeners.discard(listener)


@asynccontextmanager
async def engine_events(
    engine: Engine, request: GenerationRequest
) -> AsyncIterator[AsyncIterator[EngineEvent]]:
    """The engine's events for one request, closed on the way out (which frees its slot)."""
    events = engine.generate(request)
    try:
        yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass
class _Failure:
    error: BaseException


class _Marker:
    pass


_EOF = _Marker()  # the caller closed its request stream
_DRAIN = _Marker()  # the server started draining


class Documents:
    """The steps every RPC takes with a document: validate it, complete it, build the response."""

    def __init__(
        self,
        settings: Settings,
        state: ServiceState,
        prepare: PreparePool,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._state = state
        self._prepare = prepare
        self._metrics = metrics

    def validate(
        self, request: genstruct_pb2.GenerateRequest, *, id_required: bool = False
    ) -> GenerationRequest:
        work = to_generation_request(
            request,
            self._settings,
            id_required=id_required,
            default_constrained=self._settings.default_constrained(self._state.stand_in),
        )
        if log.isEnabledFor(logging.DEBUG):  # document text only ever at DEBUG
            log.debug(
                "document",
                extra={"id": request.id, "title": work.title, "content": work.content},
            )
        return work

    async def complete(self, engine: Engine, work: GenerationRequest) -> Completed | Chunked:
        if work.truncation is Truncation.CHUNK:
            return await self._complete_chunks(engine, work)
        return await self._complete_one(engine, work)

    async def _complete_chunks(self, engine: Engine, work: GenerationRequest) -> Chunked:
        """Every part of a chunked document, decoded side by side on whatever slots are free.

        At most n_parallel parts of one document are queued or decoding at a time, so a long
        document never fills the engine's queue by itself.
        """
        chunks = await self._prepare.run(lambda: self._chunks(engine, work))
        content = work.content
        slots = asyncio.Semaphore(max(engine.info.n_parallel // work.num_generations, 1))

        async def part(chunk: Chunk) -> Completed:
            async with slots:
                return await self._complete_one(engine, dataclasses.replace(
                    work, content=content[chunk.start : chunk.end], truncation=Truncation.REFUSE,
                ))

        tasks = [asyncio.ensure_future(part(c)) for c in chunks]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:  # one part refused or failed, so the document did: stop the rest
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return Chunked(tuple(zip(chunks, results, strict=True)))

    def _chunks(self, engine: Engine, work: GenerationRequest) -> list[Chunk]:
        """The parts of a document to chunk (on a worker thread: it tokenizes)."""
        settings = self._settings
        budget = engine.content_budget(work)
        if budget < MIN_PART_TOKENS:
            raise ContextOverflow(
                "document",
                f"the title and max_tokens {work.sampling.max_tokens:,} x "
                f"{work.num_generations} leave {max(budget, 0)} tokens of the context for "
                "content; lower max_tokens or num_generations",
                figures={"contentTokens": max(budget, 0), "limit": MIN_PART_TOKENS},
            )
        size = work.chunk_tokens or min(settings.chunk_tokens, budget)
        if size > budget:
            raise InvalidRequest(
                "chunk_tokens",
                f"is {size:,}; with max_tokens {work.sampling.max_tokens:,} x "
                f"{work.num_generations} a prompt holds at most {budget:,} content tokens",
                figures={"value": size, "limit": budget},
            )
        # a quarter of the part at most, also where the context made the part smaller
        overlap = work.chunk_overlap if work.chunk_overlap >= 0 else settings.chunk_overlap_tokens
        try:
            return split(
                work.content,
                engine.count_tokens,
                budget=size,
                overlap=min(overlap, size // 4),
                max_parts=settings.max_chunks,
            )
        except TooManyParts:
            raise TooManyChunks(
                "document.content",
                f"needs more than {settings.max_chunks} parts of up to {size:,} tokens, the "
                "server's max_chunks (raise chunk_tokens or send less content)",
                figures={"limit": settings.max_chunks, "chunkTokens": size},
            ) from None

    async def _complete_one(self, engine: Engine, work: GenerationRequest) -> Completed:
        # only the final result is read: the engine sends no text as it goes
        async with engine_events(engine, dataclasses.replace(work, stream=False)) as events:
            async for event in events:
                if isinstance(event, Completed):
                    return event
        raise RuntimeError("the engine ended a request without a Completed event")

    async def respond(
        self, request_id: str, work: GenerationRequest, result: Completed | Chunked,
        engine: Engine,
    ) -> genstruct_pb2.GenerateResponse:
        response = to_response(request_id, result, engine.info.model_name)
        min_run = self._settings.grounding_min_run_tokens
        if min_run and response.pairs:
            # word matching over the document: on a worker thread, not the event loop
            await asyncio.get_running_loop().run_in_executor(
                None, add_grounding, response, work.content, min_run
            )
        usage = response.usage
        call = current_call()
        if call is not None:
            call.prompt_tokens += usage.prompt_tokens
            call.completion_tokens += usage.completion_tokens
            call.draft_tokens += usage.draft_tokens
            call.accepted_draft_tokens += usage.accepted_draft_tokens
        metrics = self._metrics
        if metrics is not None:
            metrics.prompt_tokens.inc(usage.prompt_tokens)
            metrics.generated_tokens.inc(usage.completion_tokens)
            metrics.spec_drafted_tokens.inc(usage.draft_tokens)
            metrics.spec_accepted_tokens.inc(usage.accepted_draft_tokens)
            metrics.time_to_first_token.observe(response.timings.time_to_first_token_ms / 1000)
            failures = sum(1 for pair in response.pairs if not pair.parsed)
            if failures:
                metrics.parse_failures.inc(failures)
            if response.truncated:
                metrics.truncations.inc()
        return response

    def count_batch_item(self, code: grpc.StatusCode) -> None:
        if self._metrics is not None:
            self._metrics.batch_items.labels(code.name).inc()


class GenstructServicer(genstruct_pb2_grpc.GenstructServiceServicer):
    """Translates between the contract and the engine; never blocks the event loop."""

    def __init__(
        self,
        settings: Settings,
        state: ServiceState,
        prepare: PreparePool,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._state = state
        self._documents = Documents(settings, state, prepare, metrics)

    # --- the four RPCs ------------------------------------------------------------------

    async def Generate(
        self, request: genstruct_pb2.GenerateRequest, context: Context
    ) -> genstruct_pb2.GenerateResponse:
        with self._state.work() as engine, self._state.document(context.peer()):
            work = self._documents.validate(request)
            completed = await self._documents.complete(engine, work)
            return await self._documents.respond(request.id, work, completed, engine)

    async def GenerateStream(
        self, request: genstruct_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[genstruct_pb2.GenerateStreamResponse]:
        with self._state.work() as engine, self._state.document(context.peer()):
            work = self._documents.validate(request)
            if work.truncation is Truncation.CHUNK:
                raise InvalidRequest(
                    "truncation",
                    "TRUNCATION_CHUNK is for Generate and GenerateBatch, which return every "
                    "part's pairs together; stream the parts as documents of their own instead",
                )
            completed: Completed | None = None
            async with engine_events(engine, work) as events:
                # The first event is awaited before anything is sent, so a refusal (queue
                # full, too long) becomes the call's status rather than a broken stream.
                async for event in events:
                    if isinstance(event, TokenDelta):
                        if event.text:
                            yield genstruct_pb2.GenerateStreamResponse(
                                id=request.id,
                                delta=genstruct_pb2.TextDelta(index=event.index, text=event.text),
                            )
                    else:
                        completed = event
            if completed is None:
                raise RuntimeError("the engine ended a request without a Completed event")
            yield genstruct_pb2.GenerateStreamResponse(
                id=request.id,
                result=await self._documents.respond(request.id, work, completed, engine),
            )

    async def GenerateBatch(
        self, request_iterator: AsyncIterator[genstruct_pb2.GenerateRequest], context: Context
    ) -> AsyncIterator[genstruct_pb2.GenerateResponse]:
        with self._state.work() as engine:
            batch = _Batch(
                self._documents,
                engine,
                request_iterator,
                self._settings.max_batch_in_flight,
                self._state,
                context.peer(),
            )
            with self._state.drain_listener(batch.drain):
                async for response in batch.run():
                    yield response

    async def GetModelInfo(
        self, request: genstruct_pb2.GetModelInfoRequest, context: Context
    ) -> genstruct_pb2.GetModelInfoResponse:
        engine = self._state.engine
        if engine is None:
            raise Loading("the model is still loading; retry in a moment")
        info = engine.info
        return genstruct_pb2.GetModelInfoResponse(
            model_name=info.model_name,
            model_file=info.model_path.replace("\\", "/").rsplit("/", 1)[-1],
            quantization=info.quantization,
            parameter_count=info.parameter_count,
            architecture=info.architecture,
            context_length=info.context_length,
            train_context_length=info.train_context_length,
            n_parallel=info.n_parallel,
            gpu_layers_offloaded=info.gpu_layers_offloaded,
            total_layers=info.total_layers,
            backend=info.backend,
            service_version=__version__,
            default_sampling=default_sampling(self._settings),
            limits=limits(self._settings),
            build=build_message(info.build),
            n_batch=info.n_batch,
            n_ubatch=info.n_ubatch,
            threads=info.threads,
            threads_batch=info.threads_batch,
            flash_attn=info.flash_attn,
            cache_type_k=info.cache_type_k,
            cache_type_v=info.cache_type_v,
            speculation=speculation_message(info.speculation),
            kv_unified=info.kv_unified,
            slot_context_length=info.slot_context_length or info.context_length,
            default_constrained=self._settings.default_constrained(self._state.stand_in),
            grounding_min_run_tokens=self._settings.grounding_min_run_tokens,
        )

class _Batch:
    """One GenerateBatch stream: reads documents while fewer than the limit are in flight.

    A permit is taken before each read and given back when that document's response has been
    sent, so documents read but not yet answered never exceed `max_batch_in_flight`; a sender
    that outpaces the engine is held back by gRPC flow control.
    """

    def __init__(
        self,
        documents: Documents,
        engine: Engine,
        requests: AsyncIterator[genstruct_pb2.GenerateRequest],
        max_in_flight: int,
        state: ServiceState,
        peer: str,
    ) -> None:
        self._documents = documents
        self._state = state
        self._peer = peer
        self._engine = engine
        self._requests = requests
        self._permits = asyncio.Semaphore(max_in_flight)
        self._out: asyncio.Queue[genstruct_pb2.GenerateResponse | _Marker | _Failure] = (
            asyncio.Queue()
        )
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._owed = 0  # documents read whose response has not been sent yet

    def drain(self) -> None:
        self._out.put_nowait(_DRAIN)

    async def run(self) -> AsyncIterator[genstruct_pb2.GenerateResponse]:
        reader = asyncio.create_task(self._read())
        reading = True
        cut_short = False  # draining stopped the reading before the caller closed its side
        try:
            while reading or self._owed:
                item = await self._out.get()
                if item is _EOF:
                    reading = False
                elif item is _DRAIN:
                    if reading:
                        reader.cancel()
                        reading, cut_short = False, True
                elif isinstance(item, _Failure):
                    raise item.error
                elif isinstance(item, genstruct_pb2.GenerateResponse):
                    self._owed -= 1
                    yield item
                    self._permits.release()
            if cut_short:
                raise Draining(
                    "the server is shutting down: the documents above were finished, later "
                    "ones were not read; send them to another replica"
                )
        finally:
            reader.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(reader, *self._tasks, return_exceptions=True)

    async def _read(self) -> None:
        try:
            iterator = aiter(self._requests)
            while True:
                await self._permits.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    self._permits.release()
                    break
                self._accept(request)
            self._out.put_nowait(_EOF)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # e.g. the request stream broke: fail the whole call
            self._out.put_nowait(_Failure(exc))

    def _accept(self, request: genstruct_pb2.GenerateRequest) -> None:
        call = current_call()
        if call is not None:
            call.documents += 1
        self._owed += 1
        try:
            work = self._documents.validate(request, id_required=True)
            if request.id in self._in_flight:
                raise InvalidRequest(
                    "id",
                    f"{request.id!r} is already in flight on this stream; ids must be unique "
                    "among the documents in flight",
                )
        except InvalidRequest as exc:
            self._put_error(request.id, exc)
            return
        try:
            self._state.take_document(self._peer)
        except QueueFull as exc:
            self._put_error(request.id, exc)
            return
        self._in_flight.add(request.id)
        timeout = request.timeout_ms / 1000 if request.timeout_ms else None
        task = asyncio.create_task(self._generate(request.id, work, timeout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # a done callback runs also for a task cancelled before it started
        task.add_done_callback(lambda _: self._state.give_document(self._peer))

    async def _generate(
        self, request_id: str, work: GenerationRequest, timeout: float | None
    ) -> None:
        try:
            scope = asyncio.timeout(timeout)
            try:
                # leaving complete() early closes the engine's events, which frees the slot
                async with scope:
                    completed = await self._documents.complete(self._engine, work)
            except TimeoutError:
                if not scope.expired():
                    raise
                self._in_flight.discard(request_id)
                timeout_ms = round((timeout or 0) * 1000)
                self._put_error(request_id, DocumentTimeout(
                    f"the document's timeout_ms ({timeout_ms}) ran out",
                    figures={"timeoutMs": timeout_ms},
                ))
                return
            response = await self._documents.respond(request_id, work, completed, self._engine)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, GenstructError):
                log.error("bug in a GenerateBatch document", exc_info=exc)
            self._in_flight.discard(request_id)
            self._put_error(request_id, exc)
            return
        self._in_flight.discard(request_id)
        self._documents.count_batch_item(grpc.StatusCode.OK)
        self._out.put_nowait(response)

    def _put_error(self, request_id: str, error: Exception) -> None:
        """Answer one document with the Status of `error` (a bug's says no more than that)."""
        if isinstance(error, GenstructError):
            status = error_status(error, self._state.retry_delay(error))
        else:
            call = current_call()
            status = internal_status(call.request_id if call is not None else "")
        self._documents.count_batch_item(code_of(status))
        self._out.put_nowait(error_response(request_id, status))
