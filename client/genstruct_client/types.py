"""Small typed values the clients take: a document and the generation options."""

from __future__ import annotations

from dataclasses import dataclass

from genstruct.v1 import genstruct_pb2 as pb


@dataclass(frozen=True, slots=True)
class Document:
    """A document to generate pairs from; `id` matches results to documents in bulk calls."""

    title: str
    content: str
    id: str = ""


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """How to generate: every sampling field left as None takes the server's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    num_generations: int = 1
    # Grammar-constrained output, so every pair parses; None: the server's default
    # (GetModelInfo `default_constrained`: on for the demo stand-in).
    constrained: bool | None = None
    # Cut over-long content to fit the context (the response says `truncated`) instead of
    # having the server refuse the document.
    truncate: bool = False
    # Split over-long content into parts, each a prompt of its own (TRUNCATION_CHUNK); None
    # takes the server's default size and overlap.
    chunk: bool = False
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None

    def sampling(self) -> pb.SamplingParams:
        """The SamplingParams message, with only the fields that were set."""
        params = pb.SamplingParams(stop=list(self.stop))
        if self.temperature is not None:
            params.temperature = self.temperature
        if self.top_p is not None:
            params.top_p = self.top_p
        if self.top_k is not None:
            params.top_k = self.top_k
        if self.min_p is not None:
            params.min_p = self.min_p
        if self.repeat_penalty is not None:
            params.repeat_penalty = self.repeat_penalty
        if self.presence_penalty is not None:
            params.presence_penalty = self.presence_penalty
        if self.frequency_penalty is not None:
            params.frequency_penalty = self.frequency_penalty
        if self.seed is not None:
            params.seed = self.seed
        if self.max_tokens is not None:
            params.max_tokens = self.max_tokens
        return params

    def request(self, document: Document) -> pb.GenerateRequest:
        """The GenerateRequest for one document."""
        request = pb.GenerateRequest(
            id=document.id,
            document=pb.Document(title=document.title, content=document.content),
            sampling=self.sampling(),
            num_generations=self.num_generations,
            truncation=pb.TRUNCATION_CHUNK if self.chunk
            else pb.TRUNCATION_TRUNCATE if self.truncate else pb.TRUNCATION_UNSPECIFIED,
        )
        if self.constrained is not None:
            request.constrained = self.constrained
        if self.chunk_tokens is not None:
            request.chunk_tokens = self.chunk_tokens
        if self.chunk_overlap is not None:
            request.chunk_overlap_tokens = self.chunk_overlap
        return request


RequestLike = pb.GenerateRequest | Document


def to_request(item: RequestLike, options: GenerationOptions | None) -> pb.GenerateRequest:
    """A request as is, or a Document made into a request with `options`."""
    if isinstance(item, pb.GenerateRequest):
        return item
    return (options or GenerationOptions()).request(item)
