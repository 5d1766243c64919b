"""The engine's vocabulary: what a generation request is, what comes back, and the Protocol."""

from __future__ import annotations

import enum
import math
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import annotated_types

from genstruct_service.engine.speculation import SpeculationSettings


class FinishReason(enum.Enum):
    """Why one generation stopped."""

    EOS = "eos"  # the model's end-of-sequence token
    STOP = "stop"  # a stop string (the Genstruct `[[[User]]]` turn or one of the caller's)
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the caller went away or the engine is shutting down


class Truncation(enum.Enum):
    """What to do with content too long for the context."""

    REFUSE = "refuse"
    TRUNCATE = "truncate"
    CHUNK = "chunk"  # split into parts by the servicer; the engine takes one part at a time


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling for one request; the servicer has already filled in server defaults."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repeat_penalty: float = 1.0  # 1.0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None = a fresh random seed
    max_tokens: int = 512
    stop: tuple[str, ...] = ()  # the caller's stop strings, on top of the Genstruct stop
    ignore_eos: bool = False  # benchmarks only: generate exactly max_tokens


@dataclass(frozen=True, slots=True)
class Bound:
    """The range a sampling value must lie in; `low_open` / `high_open` exclude the ends."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: float) -> str | None:
        """Why `value` is out of range, or None when it is in it."""
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if math.isfinite(value) and not too_low and not too_high:
            return None
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"is {value}; it must be in {left}{self.low:g}, {self.high:g}{right}"

    def interval(self) -> annotated_types.Interval:
        """The bound as an annotated-types constraint, for pydantic fields."""
        low = {"gt": self.low} if self.low_open else {"ge": self.low}
        high = {"lt": self.high} if self.high_open else {"le": self.high}
        return annotated_types.Interval(**low, **high)


# The one table of what each sampling value may be: requests are checked against it at the
# service's edge and by the engine, and the server's defaults when the settings are read.
SAMPLING_BOUNDS: Mapping[str, Bound] = {
    "temperature": Bound(0.0, 5.0),
    "top_p": Bound(0.0, 1.0, low_open=True),
    "top_k": Bound(0, 1000),
    "min_p": Bound(0.0, 1.0, high_open=True),
    "repeat_penalty": Bound(0.0, 5.0, low_open=True),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
}


def sampling_problem(sampling: Sampling) -> tuple[str, str] | None:
    """(field, why) for the first value of `sampling` out of its bound; None when all are in."""
    for name, bound in SAMPLING_BOUNDS.items():
        why = bound.problem(getattr(sampling, name))
        if why is not None:
            return f"sampling.{name}", why
    if sampling.max_tokens < 1:
        return "sampling.max_tokens", f"is {sampling.max_tokens}; it must be at least 1"
    return None


@dataclass(frozen=True, slots=True)
class PromptFormat:
    """How a document becomes a completion prompt, the text that ends an answer, and what
    constrained output must look like.

    The engine is given one (Genstruct's is `genstruct_service.prompt.GENSTRUCT_FORMAT`), so it
    knows token ids, stop strings, a grammar and a marker, not the template.
    """

    render: Callable[[str, str], str]  # (title, content) -> prompt text
    stop: str  # a new turn after the answer, e.g. `[[[User]]]`
    grammar: str | None = None  # constrained mode's GBNF (root rule `root`); None: no such mode
    # constrained mode: the text between question and answer (ASCII), which the engine
    # writes for the model when its budget runs low, so that the output still parses
    answer_marker: str = ""
    answer_reserve: int = 0  # tokens kept for the answer after a forced marker


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One document to turn into `num_generations` completions."""

    title: str
    content: str
    sampling: Sampling = field(default_factory=Sampling)
    num_generations: int = 1
    constrained: bool = False  # force `question [[[Assistant]]] answer` with a grammar
    truncation: Truncation = Truncation.REFUSE
    grammar: str | None = None  # GBNF (root rule `root`) the output must match, if any
    stream: bool = True  # TokenDeltas as text comes; False: only the Completed event
    chunk_tokens: int = 0  # Truncation.CHUNK: content tokens per part (0: the default)
    chunk_overlap: int = -1  # Truncation.CHUNK: tokens of sentences repeated (-1: default)


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New text of one generation; never splits a UTF-8 character or leaks a stop string."""

    index: int  # which generation, 0 <= index < num_generations
    text: str


@dataclass(frozen=True, slots=True)
class Generation:
    """One finished completion (raw text after the prompt, stop string removed)."""

    index: int
    text: str
    finish_reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds spent queued, to the first generated token, and in all (from submission)."""

    queue_seconds: float
    first_token_seconds: float
    total_seconds: float


@dataclass(frozen=True, slots=True)
class Completed:
    """The last event of a request: every generation, usage and timings."""

    generations: tuple[Generation, ...]
    prompt_tokens: int
    truncated: bool
    timings: Timings
    draft_tokens: int = 0  # speculation: drafted tokens verified, over every generation
    accepted_draft_tokens: int = 0  # of which the sampler agreed with (each saved a step)

    @property
    def completion_tokens(self) -> int:
        return sum(g.completion_tokens for g in self.generations)


EngineEvent = TokenDelta | Completed


@dataclass(frozen=True, slots=True)
class BuildInfo:
    """What llama.cpp build runs, for the startup log, `--version` and GetModelInfo."""

    llama_cpp_python: str  # the bindings' version, which pins the llama.cpp they vendor
    profile: str  # tools/llama_build.py's profile, or "unknown" if it did not install it
    build_key: str  # that tool's hash of the build's flags ("" if unknown)
    backends: tuple[str, ...]  # registered ggml backends, e.g. ("CPU",) or ("CUDA", "CPU")
    devices: tuple[str, ...]  # e.g. "CUDA0 (GPU): NVIDIA L4, 22.1 GiB"
    cpu_variant: str  # the CPU library a portable build picked (e.g. "icelake"), or "built in"
    cpu_features: tuple[str, ...]  # what the CPU backend was compiled to use, e.g. AVX2
    system_info: str  # llama_print_system_info(), verbatim

    @property
    def has_amx(self) -> bool:
        return any(f.startswith("AMX") for f in self.cpu_features)

    def summary(self) -> str:
        devices = "; ".join(self.devices) or "none"
        return (
            f"llama-cpp-python {self.llama_cpp_python} ({self.profile} build"
            f"{' ' + self.build_key if self.build_key else ''}), backends "
            f"{', '.join(self.backends) or 'none'}, CPU variant {self.cpu_variant}, "
            f"CPU features {' '.join(self.cpu_features) or 'none'}; devices: {devices}"
        )


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the engine runs on, for GetModelInfo and the logs."""

    model_name: str  # e.g. "genstruct-7b:Q4_K_M" or the file stem
    model_path: str
    quantization: str  # e.g. "Q4_K_M", from the GGUF file type
    parameter_count: int
    architecture: str  # general.architecture, e.g. "llama"
    context_length: int  # n_ctx of the context (all slots together)
    train_context_length: int  # the model's own context length
    n_parallel: int
    gpu_layers_offloaded: int
    total_layers: int
    backend: str  # "CPU", "CUDA", "Metal", ...
    build: BuildInfo | None = None  # None for an engine that is not llama.cpp
    # llama.cpp context settings in force (0 / "" for an engine that has none)
    n_batch: int = 0
    n_ubatch: int = 0
    threads: int = 0
    threads_batch: int = 0
    flash_attn: str = ""  # "on" or "off" as llama.cpp resolved the setting ("auto" if unknown)
    cache_type_k: str = ""
    cache_type_v: str = ""
    speculation: SpeculationSettings | None = None  # None for an engine that has none
    kv_unified: bool = True  # one KV pool for every slot, or one stream per slot
    slot_context_length: int = 0  # most tokens one slot holds (0: context_length)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for metrics and tests."""

    busy_slots: int
    queued: int
    n_parallel: int


class Engine(Protocol):
    """What the gRPC layer needs from a generation engine."""

    @property
    def info(self) -> EngineInfo: ...

    def stats(self) -> EngineStats: ...

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone in the model's vocabulary (thread-safe, may be slow)."""
        ...

    def content_budget(self, request: GenerationRequest) -> int:
        """The most content tokens a prompt of `request` can hold with room for every
        generation's max_tokens (thread-safe, may be slow; below 1: none fits)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Yield TokenDeltas as they are made, then exactly one Completed.

        Raises the errors of `genstruct_service.errors` before the first event when the
        request is refused (queue full, can never fit, too long). Closing the iterator, or
        cancelling the task that iterates it, cancels the request and frees its slot within
        one engine step.
        """
        ...

    async def close(self) -> None:
        """Cancel everything in flight, stop the engine thread and free the model."""
        ...

    async def wait_failed(self) -> BaseException:
        """Return the error once the engine has failed for good (at once if it already has).

        From then on it serves nothing: every request in flight has been failed and new ones
        raise ModelError. It never returns for an engine that is closed without failing, so a
        caller watching it cancels the wait when it stops.
        """
        ...
