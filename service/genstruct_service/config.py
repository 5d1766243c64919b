"""The server's settings: one object, each field with an env var (GENSTRUCT_*) and a flag."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import annotated_types
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from .chunking import MIN_PART_TOKENS
from .engine import speculation as spec
from .engine.types import SAMPLING_BOUNDS
from .grounding import DEFAULT_MIN_RUN

_SPEC = spec.SpeculationSettings()


def _bounded(name: str) -> annotated_types.Interval:
    """The bound of sampling value `name`: the defaults obey the requests' bounds."""
    return SAMPLING_BOUNDS[name].interval()


DEFAULT_MODEL = "genstruct-7b:Q4_K_M"
# llama.cpp takes the engine's sizes as 32-bit C integers, and ctypes would wrap larger ones
# silently into other values
C_INT_MAX = 2**31 - 1


class Settings(BaseSettings):
    """Configuration of `genstruct-server`; `genstruct-server --help` lists every field."""

    model_config = SettingsConfigDict(
        env_prefix="GENSTRUCT_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="genstruct-server",
        validate_default=True,
        extra="forbid",
    )

    # The model
    model: str = Field(
        DEFAULT_MODEL,
        description="The model: a path to a .gguf file, a registry name (genstruct-7b:Q4_K_M, "
        "demo; see `genstruct-server models list`) or hf://owner/repo/file.gguf.",
    )
    models_dir: Path = Field(
        Path("models"), description="Folder that holds downloaded models (the registry's home)."
    )
    fallback_to_demo: bool = Field(
        False,
        description="If the model cannot be had, serve the small `demo` stand-in instead, with "
        "a warning (the quickstart does this; a production server should not).",
    )

    # Where it listens
    host: str = Field(
        "127.0.0.1",
        description="Address to bind. The default serves only this machine (a sidecar); "
        "use 0.0.0.0 or :: to accept remote callers.",
    )
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus metrics port; 0 = off.")
    metrics_host: str | None = Field(
        None,
        description="Address the metrics port binds; unset = the gRPC host, but loopback when "
        "that is a wildcard (0.0.0.0, ::), so metrics are not published with the service by "
        "accident; 0.0.0.0 for a scraper on another machine.",
    )

    # The engine
    n_parallel: int = Field(
        4, ge=1, le=256, description="Documents decoded together (slots of the engine)."
    )
    n_ctx: int = Field(
        8192,
        ge=256,
        le=C_INT_MAX,
        description="Tokens of KV cache, all slots together: each slot holds n_ctx / n_parallel "
        "(with --kv-unified, any one may use most of it).",
    )
    n_batch: int = Field(
        512,
        ge=1,
        le=C_INT_MAX,
        description="Most tokens in one decode step (prompt chunks plus one token per "
        "generating slot); at least n_parallel.",
    )
    n_ubatch: int | None = Field(
        None,
        ge=1,
        le=C_INT_MAX,
        description="Most tokens llama.cpp computes at once (at most n_batch; unset = "
        "min(512, n_batch)); the attention scratch buffer grows with n_ubatch times the KV "
        "cache in use.",
    )
    n_gpu_layers: int = Field(
        -1, ge=-1, le=C_INT_MAX, description="Layers to offload to the GPU; -1 = all, 0 = CPU only."
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=C_INT_MAX,
        description="CPU threads for generation; unset = the CPUs this process may use "
        "(its affinity and cgroup quota).",
    )
    threads_batch: int | None = Field(
        None, ge=1, le=C_INT_MAX, description="CPU threads for prompt processing; unset = threads."
    )
    flash_attn: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Flash attention: auto (llama.cpp turns it on where the device has it), "
        "on or off.",
    )
    cache_type_k: Literal["f16", "q8_0", "q4_0"] = Field(
        "f16", description="Element type of the KV cache's keys (q8_0 halves its memory)."
    )
    cache_type_v: Literal["f16", "q8_0", "q4_0"] = Field(
        "f16", description="Element type of the KV cache's values; quantized needs flash_attn."
    )
    kv_unified: bool = Field(
        False,
        description="One KV pool for all slots, so one long document may use most of n_ctx; "
        "by default each slot has its own stream, which attention reads alone (faster when "
        "documents decode together).",
    )
    speculation: Literal["auto", "always", "off"] = Field(
        "auto",
        description="Draft tokens from n-gram matches against the document and verify them "
        "in the decode step: auto drafts where the engine's measured step times say it "
        "pays, always wherever a match gives a draft, off never.",
    )
    spec_draft_max: int = Field(
        _SPEC.draft_max, ge=1, le=spec.DRAFT_LIMIT,
        description="Most drafted tokens per sequence per step.",
    )
    spec_ngram_min: int = Field(
        _SPEC.ngram_min, ge=1, le=spec.NGRAM_MIN_LIMIT,
        description="Shortest match of the last generated tokens that proposes a draft.",
    )
    spec_ngram_max: int = Field(
        _SPEC.ngram_max, ge=1, le=spec.NGRAM_MAX_LIMIT,
        description="Match lengths are told apart up to this, to learn how often each "
        "kind of draft is accepted.",
    )
    prepare_threads: int = Field(
        2,
        ge=1,
        le=256,
        description="Threads that split TRUNCATION_CHUNK documents into parts; up to max_queue "
        "more documents wait for one, later ones are refused (RESOURCE_EXHAUSTED).",
    )
    max_queue: int = Field(
        256,
        ge=1,
        description="Documents waiting for a slot before new ones are refused "
        "(RESOURCE_EXHAUSTED).",
    )

    queue_share_per_connection: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Share of the documents the server holds (max_queue + n_parallel) that "
        "one connection may hold; beyond it that connection's documents are refused "
        "(RESOURCE_EXHAUSTED), so one bulk job cannot refuse every other caller.",
    )

    # Defaults for sampling fields a request leaves unset
    temperature: Annotated[float, _bounded("temperature")] = Field(
        0.7, description="Default temperature."
    )
    top_p: Annotated[float, _bounded("top_p")] = Field(1.0, description="Default top_p (1 = off).")
    top_k: Annotated[int, _bounded("top_k")] = Field(0, description="Default top_k (0 = off).")
    min_p: Annotated[float, _bounded("min_p")] = Field(0.05, description="Default min_p (0 = off).")
    repeat_penalty: Annotated[float, _bounded("repeat_penalty")] = Field(
        1.0, description="Default repeat penalty (1 = off)."
    )
    presence_penalty: Annotated[float, _bounded("presence_penalty")] = Field(
        0.0, description="Default presence penalty."
    )
    frequency_penalty: Annotated[float, _bounded("frequency_penalty")] = Field(
        0.0, description="Default frequency penalty."
    )
    default_max_tokens: int = Field(
        512, ge=1, description="Tokens to generate per pair when a request does not say."
    )

    # Limits on requests
    max_tokens_limit: int = Field(2048, ge=1, description="Most max_tokens a request may ask.")
    max_title_chars: int = Field(2_000, ge=0, description="Most characters in a title.")
    max_content_chars: int = Field(
        100_000, ge=1, description="Most characters in a document's content."
    )
    max_num_generations: int = Field(
        8,
        ge=1,
        le=64,
        description="Most generations (pairs) per document; never more than n_parallel, "
        "since each generation takes a slot.",
    )
    max_stop_strings: int = Field(8, ge=0, description="Most stop strings per request.")
    max_stop_chars: int = Field(64, ge=1, description="Most characters in one stop string.")
    max_id_chars: int = Field(256, ge=1, description="Most characters in a request id.")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Most bytes in one gRPC message, each way."
    )
    chunk_tokens: int = Field(
        1024, ge=MIN_PART_TOKENS, le=C_INT_MAX,
        description="TRUNCATION_CHUNK: content tokens per part when a request does not say.",
    )
    chunk_overlap_tokens: int = Field(
        64, ge=0, le=C_INT_MAX,
        description="TRUNCATION_CHUNK: tokens of whole sentences repeated from one part to the "
        "next when a request does not say (at most a quarter of the part).",
    )
    max_chunks: int = Field(
        64, ge=1, le=4096,
        description="TRUNCATION_CHUNK: most parts of one document; longer content is refused.",
    )
    max_batch_in_flight: int = Field(
        64,
        ge=1,
        description="Documents of one GenerateBatch stream worked on at a time; the stream "
        "reads no more until results go out.",
    )

    # What a response says of its pairs
    constrained: bool | None = Field(
        None,
        description="Default of a request's `constrained` when it leaves it unset (a "
        "request may override it): grammar-constrained output, so every pair parses. Unset: "
        "on when the server serves the small demo stand-in (which seldom writes the "
        "Genstruct markers by itself), off for any other model.",
    )
    grounding_min_run_tokens: int = Field(
        DEFAULT_MIN_RUN,
        ge=0,
        le=1024,
        description="Shortest run of words an answer (or question) must copy from the "
        "document to count as grounded: each pair's evidence spans and grounding share are "
        "computed with it. 0 computes no grounding.",
    )

    # Lifecycle
    drain_seconds: float = Field(
        30.0,
        ge=0.0,
        description="On SIGTERM/SIGINT, how long in-flight work may take to finish before "
        "the server exits.",
    )

    # Security
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain of the server; with tls_key_file enables TLS."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of the server.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle; when set, clients must present a certificate it signed "
        "(mutual TLS).",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="Bearer token callers must send as `authorization: Bearer <token>` "
        "metadata; health checks stay open. An empty or blank token is refused.",
    )
    auth_token_file: Path | None = Field(
        None,
        description="File holding the bearer token (surrounding whitespace trimmed), so that "
        "it appears neither in the command line nor in the environment; instead of "
        "auth_token.",
    )

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level. Document text is logged only at DEBUG."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line; text: for a terminal."
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        # every problem at once, one line each (the CLI prints one line per line), so a
        # fix of one does not just reveal the next
        problems = []
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            problems.append("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.default_max_tokens > self.max_tokens_limit:
            problems.append(
                f"default_max_tokens ({self.default_max_tokens}) is above "
                f"max_tokens_limit ({self.max_tokens_limit})"
            )
        if self.n_batch < self.n_parallel:
            problems.append(
                f"n_batch ({self.n_batch}) must be at least n_parallel ({self.n_parallel}): "
                "every generating slot adds a token to each decode step"
            )
        if self.n_ubatch is not None and self.n_ubatch > self.n_batch:
            problems.append(f"n_ubatch ({self.n_ubatch}) must be at most n_batch ({self.n_batch})")
        if self.cache_type_v != "f16" and self.flash_attn == "off":
            problems.append(f"cache_type_v {self.cache_type_v} needs flash_attn auto or on")
        if self.n_ctx < self.n_parallel * 64:
            problems.append(
                f"n_ctx ({self.n_ctx}) leaves fewer than 64 tokens per slot for "
                f"n_parallel {self.n_parallel}"
            )
        problems.extend(self._read_auth_token())
        problems.extend(self.speculation_settings.problems())
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _read_auth_token(self) -> list[str]:
        """The token from auth_token_file into auth_token; the problems with either."""
        if self.auth_token_file is not None:
            if self.auth_token is not None:
                return ["give auth_token or auth_token_file, not both"]
            try:
                text = self.auth_token_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                return [f"auth_token_file {self.auth_token_file} cannot be read: {exc}"]
            if not text.strip():
                return [f"auth_token_file {self.auth_token_file} is empty; put the token in it"]
            self.auth_token = SecretStr(text.strip())
        elif self.auth_token is not None and not self.auth_token.get_secret_value().strip():
            return [
                "auth_token is empty or blank, which would let every caller in; set a token, "
                "or unset GENSTRUCT_AUTH_TOKEN to serve without one"
            ]
        return []

    @property
    def speculation_settings(self) -> spec.SpeculationSettings:
        return spec.SpeculationSettings(
            mode=self.speculation,
            draft_max=self.spec_draft_max,
            ngram_min=self.spec_ngram_min,
            ngram_max=self.spec_ngram_max,
        )

    @property
    def metrics_bind_host(self) -> str:
        """Where the metrics port binds (see metrics_host)."""
        if self.metrics_host is not None:
            return self.metrics_host
        return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    def default_constrained(self, stand_in: bool) -> bool:
        """What a request that leaves `constrained` unset gets, serving a stand-in or not."""
        return stand_in if self.constrained is None else self.constrained

    @property
    def generations_limit(self) -> int:
        """Most num_generations a request may ask: each generation decodes in a slot of its own."""
        return min(self.max_num_generations, self.n_parallel)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None


def settings_from_args(argv: list[str] | None) -> Settings:
    """Settings from flags, then GENSTRUCT_* env vars, then defaults."""
    return CliApp.run(Settings, cli_args=argv if argv is not None else None)
