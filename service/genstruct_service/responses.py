"""Engine results to protobuf responses: completions parsed into pairs."""

from __future__ import annotations

from genstruct.v1 import genstruct_pb2
from google.rpc import status_pb2

from .engine.speculation import SpeculationSettings
from .engine.types import BuildInfo, Completed, FinishReason
from .prompt import parse_completion

_FINISH = {
    FinishReason.EOS: genstruct_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: genstruct_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: genstruct_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: genstruct_pb2.FINISH_REASON_CANCELLED,
}


def to_response(
    request_id: str, completed: Completed, model_name: str
) -> genstruct_pb2.GenerateResponse:
    """The response for one finished document: one parsed pair per generation, by index."""
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
            )
        )
    timings = completed.timings
    return genstruct_pb2.GenerateResponse(
        id=request_id,
        pairs=pairs,
        model_name=model_name,
        usage=genstruct_pb2.Usage(
            prompt_tokens=completed.prompt_tokens,
            completion_tokens=completed.completion_tokens,
            draft_tokens=completed.draft_tokens,
            accepted_draft_tokens=completed.accepted_draft_tokens,
        ),
        timings=genstruct_pb2.Timings(
            queue_ms=timings.queue_seconds * 1000.0,
            time_to_first_token_ms=timings.first_token_seconds * 1000.0,
            total_ms=timings.total_seconds * 1000.0,
        ),
        truncated=completed.truncated,
    )


def error_response(request_id: str, code: int, message: str) -> genstruct_pb2.GenerateResponse:
    """A GenerateBatch item that failed: `code` is a google.rpc.Code (grpc.StatusCode's int)."""
    return genstruct_pb2.GenerateResponse(
        id=request_id, error=status_pb2.Status(code=code, message=message)
    )


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
