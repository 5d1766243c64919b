"""Pure checks of a GenerateRequest against the server's limits, giving the engine's request."""

from __future__ import annotations

from genstruct.v1 import genstruct_pb2

from .chunking import MIN_PART_TOKENS
from .config import Settings
from .engine.types import SAMPLING_BOUNDS, GenerationRequest, Sampling, Truncation
from .errors import InvalidRequest

_MAX_SEED = 2**32 - 1

_TRUNCATION = {
    genstruct_pb2.TRUNCATION_UNSPECIFIED: Truncation.REFUSE,
    genstruct_pb2.TRUNCATION_REFUSE: Truncation.REFUSE,
    genstruct_pb2.TRUNCATION_TRUNCATE: Truncation.TRUNCATE,
    genstruct_pb2.TRUNCATION_CHUNK: Truncation.CHUNK,
}


def check_id(request_id: str, settings: Settings, *, required: bool) -> None:
    """The caller's id: at most max_id_chars, and present when `required` (GenerateBatch)."""
    if required and not request_id:
        raise InvalidRequest(
            "id", "is required in GenerateBatch, to match each result to its document"
        )
    if len(request_id) > settings.max_id_chars:
        raise InvalidRequest(
            "id", f"has {len(request_id)} characters; the limit is {settings.max_id_chars}",
            figures={"value": len(request_id), "limit": settings.max_id_chars},
        )


def _sampling(params: genstruct_pb2.SamplingParams, settings: Settings) -> Sampling:
    values: dict[str, float] = {}
    for name, bound in SAMPLING_BOUNDS.items():
        if not params.HasField(name):  # type: ignore[arg-type]
            values[name] = getattr(settings, name)
            continue
        value = getattr(params, name)
        why = bound.problem(value)
        if why is not None:
            raise InvalidRequest(f"sampling.{name}", why, figures={"value": value})
        values[name] = value
    seed: int | None = None
    if params.HasField("seed"):
        if params.seed > _MAX_SEED:
            raise InvalidRequest(
                "sampling.seed", f"is {params.seed}; it must be 0 to 2^32 - 1",
                figures={"value": params.seed, "limit": _MAX_SEED},
            )
        seed = params.seed
    max_tokens = settings.default_max_tokens
    if params.HasField("max_tokens"):
        if not 1 <= params.max_tokens <= settings.max_tokens_limit:
            raise InvalidRequest(
                "sampling.max_tokens",
                f"is {params.max_tokens}; it must be 1 to {settings.max_tokens_limit} "
                "(the server's max_tokens_limit)",
                figures={"value": params.max_tokens, "limit": settings.max_tokens_limit},
            )
        max_tokens = params.max_tokens
    if len(params.stop) > settings.max_stop_strings:
        raise InvalidRequest(
            "sampling.stop",
            f"has {len(params.stop)} strings; the limit is {settings.max_stop_strings}",
            figures={"value": len(params.stop), "limit": settings.max_stop_strings},
        )
    for i, stop in enumerate(params.stop):
        if not stop:
            raise InvalidRequest(f"sampling.stop[{i}]", "is empty; stop strings must not be")
        if len(stop) > settings.max_stop_chars:
            raise InvalidRequest(
                f"sampling.stop[{i}]",
                f"has {len(stop)} characters; the limit is {settings.max_stop_chars}",
                figures={"value": len(stop), "limit": settings.max_stop_chars},
            )
    return Sampling(
        temperature=values["temperature"],
        top_p=values["top_p"],
        top_k=int(values["top_k"]),
        min_p=values["min_p"],
        repeat_penalty=values["repeat_penalty"],
        presence_penalty=values["presence_penalty"],
        frequency_penalty=values["frequency_penalty"],
        seed=seed,
        max_tokens=max_tokens,
        stop=tuple(params.stop),
    )


def to_generation_request(
    request: genstruct_pb2.GenerateRequest,
    settings: Settings,
    *,
    id_required: bool = False,
    default_constrained: bool = False,
) -> GenerationRequest:
    """Check every field against the server's limits and fill unset ones from its defaults
    (`constrained` from `default_constrained`).

    Raises InvalidRequest naming the first field that is wrong and the limit it broke.
    """
    check_id(request.id, settings, required=id_required)
    title, content = request.document.title, request.document.content
    if len(title) > settings.max_title_chars:
        raise InvalidRequest(
            "document.title",
            f"has {len(title)} characters; the limit is {settings.max_title_chars}",
            figures={"value": len(title), "limit": settings.max_title_chars},
        )
    if not content.strip():
        raise InvalidRequest("document.content", "is empty; send the document's text")
    if len(content) > settings.max_content_chars:
        raise InvalidRequest(
            "document.content",
            f"has {len(content)} characters; the limit is {settings.max_content_chars} "
            "(split the document)",
            figures={"value": len(content), "limit": settings.max_content_chars},
        )
    num_generations = request.num_generations or 1
    if num_generations > settings.generations_limit:
        raise InvalidRequest(
            "num_generations",
            f"is {num_generations}; the limit is {settings.generations_limit} "
            f"(max_num_generations {settings.max_num_generations}, n_parallel "
            f"{settings.n_parallel}: each generation takes a slot)",
            figures={"value": num_generations, "limit": settings.generations_limit},
        )
    truncation = _TRUNCATION.get(request.truncation)
    if truncation is None:
        raise InvalidRequest("truncation", f"{request.truncation} is not a Truncation value")
    if 0 < request.chunk_tokens < MIN_PART_TOKENS:
        raise InvalidRequest(
            "chunk_tokens",
            f"is {request.chunk_tokens}; it must be 0 (the server's default) or at least "
            f"{MIN_PART_TOKENS}",
            figures={"value": request.chunk_tokens, "limit": MIN_PART_TOKENS},
        )
    # -1: the server's default, sized to the part when the document is split
    overlap = request.chunk_overlap_tokens if request.HasField("chunk_overlap_tokens") else -1
    part = request.chunk_tokens or settings.chunk_tokens
    if overlap > part // 4:
        whose = "chunk_tokens" if request.chunk_tokens else "the server's chunk_tokens"
        raise InvalidRequest(
            "chunk_overlap_tokens",
            f"is {overlap:,}; it must be at most a quarter of the part, {part // 4:,} "
            f"({whose} {part:,})",
            figures={"value": overlap, "limit": part // 4},
        )
    return GenerationRequest(
        title=title,
        content=content,
        sampling=_sampling(request.sampling, settings),
        num_generations=num_generations,
        constrained=request.constrained
        if request.HasField("constrained")
        else default_constrained,
        truncation=truncation,
        chunk_tokens=request.chunk_tokens,
        chunk_overlap=overlap,
    )


def default_sampling(settings: Settings) -> genstruct_pb2.SamplingParams:
    """The sampling a request gets for fields it leaves unset (seed: fresh per request)."""
    return genstruct_pb2.SamplingParams(
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        min_p=settings.min_p,
        repeat_penalty=settings.repeat_penalty,
        presence_penalty=settings.presence_penalty,
        frequency_penalty=settings.frequency_penalty,
        max_tokens=settings.default_max_tokens,
    )


def limits(settings: Settings) -> genstruct_pb2.Limits:
    """The limits of this server, as GetModelInfo reports them."""
    return genstruct_pb2.Limits(
        max_title_chars=settings.max_title_chars,
        max_content_chars=settings.max_content_chars,
        max_num_generations=settings.generations_limit,
        max_tokens=settings.max_tokens_limit,
        max_stop_strings=settings.max_stop_strings,
        max_stop_chars=settings.max_stop_chars,
        max_message_bytes=settings.max_message_bytes,
        max_batch_in_flight=settings.max_batch_in_flight,
        max_chunks=settings.max_chunks,
        default_chunk_tokens=settings.chunk_tokens,
        default_chunk_overlap_tokens=settings.chunk_overlap_tokens,
    )
