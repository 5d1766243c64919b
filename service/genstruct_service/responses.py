"""Engine results to protobuf responses: completions parsed into pairs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from genstruct.v1 import genstruct_pb2
from google.rpc import status_pb2

from .chunking import Chunk
from .engine.speculation import SpeculationSettings
from .engine.types import BuildInfo, Completed, FinishReason
from .grounding import ContentIndex
from .prompt import parse_completion

_FINISH = {
    FinishReason.EOS: genstruct_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: genstruct_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: genstruct_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: genstruct_pb2.FINISH_REASON_CANCELLED,
}


@dataclass(frozen=True, slots=True)
class Chunked:
    """A document split into parts (TRUNCATION_CHUNK): each part and what it gave."""

    parts: tuple[tuple[Chunk, Completed], ...]


def _pairs(completed: Completed, chunk: Chunk | None) -> list[genstruct_pb2.Pair]:
    pairs = []
    for generation in sorted(completed.generations, key=lambda g: g.index):
        parsed = parse_completion(generation.text)
        pairs.append(
            genstruct_pb2.Pair(
                user=parsed.user or "",
                assistant=parsed.assistant or "",
                parsed=parsed.parsed,
                raw_text=generation.text,
                finish_reason=_FINISH[generation.finish_reason],
                completion_tokens=generation.completion_tokens,
                index=generation.index,
                chunk_index=chunk.index if chunk else 0,
                chunk_start=chunk.start if chunk else 0,
                chunk_end=chunk.end if chunk else 0,
            )
        )
    return pairs


def to_response(
    request_id: str, result: Completed | Chunked, model_name: str
) -> genstruct_pb2.GenerateResponse:
    """The response for one finished document: one parsed pair per generation, by index
    (by part first when it was chunked), usage summed over the parts."""
    parts: Sequence[tuple[Chunk | None, Completed]] = (
        result.parts if isinstance(result, Chunked) else [(None, result)]
    )
    done = [completed for _, completed in parts]
    return genstruct_pb2.GenerateResponse(
        id=request_id,
        pairs=[pair for chunk, completed in parts for pair in _pairs(completed, chunk)],
        model_name=model_name,
        usage=genstruct_pb2.Usage(
            prompt_tokens=sum(c.prompt_tokens for c in done),
            completion_tokens=sum(c.completion_tokens for c in done),
            draft_tokens=sum(c.draft_tokens for c in done),
            accepted_draft_tokens=sum(c.accepted_draft_tokens for c in done),
        ),
        # the parts ran side by side: the first to leave the queue and to write, the last
        # to end
        timings=genstruct_pb2.Timings(
            queue_ms=min(c.timings.queue_seconds for c in done) * 1000.0,
            time_to_first_token_ms=min(c.timings.first_token_seconds for c in done) * 1000.0,
            total_ms=max(c.timings.total_seconds for c in done) * 1000.0,
        ),
        truncated=any(c.truncated for c in done),
        chunks=len(parts),
    )


def add_grounding(response: genstruct_pb2.GenerateResponse, content: str, min_run: int) -> None:
    """Sets every pair's evidence, grounding and question_grounding, against the part of
    `content` it was generated from (the whole content when it was not chunked).

    Word matching over the document: run it on a worker thread.
    """
    indexes: dict[int, ContentIndex] = {}
    for pair in response.pairs:
        if not pair.parsed:
            continue
        index = indexes.get(pair.chunk_index)
        if index is None:
            if pair.chunk_end:  # a part of a chunked document
                part = content[pair.chunk_start : pair.chunk_end]
                index = ContentIndex(part, min_run, offset=pair.chunk_start)
            else:
                index = ContentIndex(content, min_run)
            indexes[pair.chunk_index] = index
        answer = index.ground(pair.assistant)
        pair.evidence.extend(
            genstruct_pb2.Span(start=start, end=end) for start, end in answer.evidence
        )
        pair.grounding = answer.share
        pair.question_grounding = index.ground(pair.user).share


def error_response(request_id: str, error: status_pb2.Status) -> genstruct_pb2.GenerateResponse:
    """A GenerateBatch item that failed, answered with its Status (and the details in it)."""
    return genstruct_pb2.GenerateResponse(id=request_id, error=error)


def speculation_message(
    speculation: SpeculationSettings | None,
) -> genstruct_pb2.Speculation | None:
    """GetModelInfo's `speculation`; None (unset) for an engine that has none."""
    if speculation is None:
        return None
    return genstruct_pb2.Speculation(
        mode=speculation.mode,
        draft_max=speculation.draft_max,
        ngram_min=speculation.ngram_min,
        ngram_max=speculation.ngram_max,
    )


def build_message(build: BuildInfo | None) -> genstruct_pb2.BuildInfo | None:
    """GetModelInfo's `build`; None (the field unset) for an engine that is not llama.cpp."""
    if build is None:
        return None
    return genstruct_pb2.BuildInfo(
        llama_cpp_python_version=build.llama_cpp_python,
        profile=build.profile,
        build_key=build.build_key,
        backends=build.backends,
        devices=build.devices,
        cpu_variant=build.cpu_variant,
        cpu_features=build.cpu_features,
        system_info=build.system_info,
    )
