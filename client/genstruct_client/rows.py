"""The one row shape of a pair: the columns the bulk output and the distilabel step share."""

from __future__ import annotations

from typing import Any

from genstruct.v1 import genstruct_pb2 as pb

# A pair's columns, in the order rows hold them: distilabel's (user, assistant, model_name),
# then the service's. `duplicate_of` is set by the curation of a run (None: not a duplicate,
# or not looked for).
PAIR_COLUMNS = (
    "user",
    "assistant",
    "model_name",
    "parsed",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "truncated",
    "raw_text",
    "evidence",
    "grounding",
    "question_grounding",
    "duplicate_of",
)

FINISH_REASONS = {
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}


def _share(value: float) -> float:
    # a float32 on the wire: four decimals say all it means
    return round(float(value), 4)


def pair_columns(response: pb.GenerateResponse, pair: pb.Pair) -> dict[str, Any]:
    """The columns of one pair of `response`, in PAIR_COLUMNS order.

    `user` and `assistant` are None for a completion that did not parse (as distilabel's);
    `evidence` is a list of {"start", "end"} code point spans of the content.
    """
    return {
        "user": pair.user if pair.parsed else None,
        "assistant": pair.assistant if pair.parsed else None,
        "model_name": response.model_name,
        "parsed": pair.parsed,
        "finish_reason": FINISH_REASONS.get(pair.finish_reason, "unspecified"),
        "prompt_tokens": response.usage.prompt_tokens,
        "completion_tokens": pair.completion_tokens,
        "truncated": response.truncated,
        "raw_text": pair.raw_text,
        "evidence": [{"start": span.start, "end": span.end} for span in pair.evidence],
        "grounding": _share(pair.grounding),
        "question_grounding": _share(pair.question_grounding),
        "duplicate_of": None,
    }


def duplicate_key(doc_id: str, generation: int, chunk_index: int | None = None) -> dict[str, Any]:
    """A row's `duplicate_of`: the row it repeats (`chunk_index` only for a chunked run)."""
    key: dict[str, Any] = {"id": doc_id, "generation": generation}
    if chunk_index is not None:
        key["chunk_index"] = chunk_index
    return key
