"""A distilabel step that runs Genstruct through the service: a drop-in for `Genstruct(llm=...)`.

Needs the `distilabel` extra (`pip install 'genstruct-grpc[distilabel]'`); nothing else in the
client imports this module, so the light client does not need distilabel.
"""

# No `from __future__ import annotations`: distilabel finds the rows argument of `process` by
# its `StepInput` annotation at run time, which a string annotation would hide.

import asyncio
import contextlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

try:
    from distilabel.constants import DISTILABEL_METADATA_KEY
    from distilabel.mixins.runtime_parameters import RuntimeParameter
    from distilabel.steps import Step, StepInput
except ImportError as exc:
    raise ImportError(
        "genstruct_client.distilabel_step needs distilabel: "
        "pip install 'genstruct-grpc[distilabel]'"
    ) from exc
import grpc
from genstruct.v1 import genstruct_pb2 as pb
from pydantic import Field, PositiveInt, PrivateAttr, SecretStr

from genstruct_client._batching import BatchAborted, ResubmitPolicy
from genstruct_client.aio import AsyncGenstructClient
from genstruct_client.bulk.writers import encode_line
from genstruct_client.channel import (
    DEFAULT_TARGET,
    ChannelConfig,
    TlsConfig,
    resolve_target,
    target_addresses,
)
from genstruct_client.curation import DEFAULT_THRESHOLD, Filters, QuestionIndex
from genstruct_client.errors import ErrorDetails
from genstruct_client.rows import duplicate_key, pair_columns
from genstruct_client.types import Document, GenerationOptions

if TYPE_CHECKING:
    from distilabel.typing import StepColumns, StepOutput

__all__ = ["EXTRA_COLUMNS", "GenstructService"]

T = TypeVar("T")
Row = dict[str, Any]
ExtraColumn = Literal[
    "parsed",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "truncated",
    "raw_text",
    "generation_index",
    "error",
    "evidence",
    "grounding",
    "question_grounding",
    "duplicate_of",
]
# The service's own columns, as the bulk CLI writes them; opt-in, so that by default the
# step's columns are exactly those of distilabel's Genstruct task.
EXTRA_COLUMNS: tuple[str, ...] = get_args(ExtraColumn)
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
# Seconds to wait for GetModelInfo when an error row needs the model's name.
_INFO_TIMEOUT = 5.0


class _Connection:
    """One AsyncGenstructClient (one channel) on an event loop of its own thread.

    distilabel calls `process` from synchronous code, batch after batch, and an asyncio
    channel belongs to the loop that made it: so the loop outlives the batches, and the
    connections (and round_robin's spread over them) stay up between them.
    """

    def __init__(self, config: ChannelConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="genstruct-distilabel", daemon=True
        )
        self._thread.start()
        self.client = self.run(_open(config))

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        try:
            self.run(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            if not self._thread.is_alive():
                self._loop.close()


async def _open(config: ChannelConfig) -> AsyncGenstructClient:
    return AsyncGenstructClient(config=config)


class GenstructService(Step):  # type: ignore[misc]  # distilabel is untyped
    """Generates instruction/response pairs from documents with a Genstruct gRPC service.

    A drop-in for distilabel's `Genstruct(llm=...)`: same inputs, same columns, one row per
    pair (or per document with `group_generations`). Each batch of rows goes through
    GenerateBatch with `concurrency` documents in flight per stream, resubmitted on transient
    failures, spread over the servers of `target` with round_robin. A document that fails
    (refused, or no result within `retry_budget`) gives rows with None in `user` and
    `assistant` and the reason in `distilabel_metadata["error_<step name>"]` (and in the
    `error` column, when asked for): the pipeline goes on.

    Input columns:
        - title (`str`): the document's title (None counts as empty).
        - content (`str`): the document's text.

    Output columns:
        - user (`str`): the question; None when the completion did not parse or failed.
        - assistant (`str`): the answer; None when the completion did not parse or failed.
        - model_name (`str`): the model that generated the pair, as the server reports it.
        - distilabel_metadata: `raw_output_<name>` (the completion, with `add_raw_output`),
          `statistics_<name>` (`input_tokens`, `output_tokens`) and `error_<name>` (the
          reason a document failed, else None); no `raw_input_<name>`, since the server,
          not the step, renders the prompt. Keys that earlier steps put there are kept.
        - `extra_columns`, each only when asked for: parsed (`bool`), finish_reason (`str`:
          eos, stop, length, cancelled), prompt_tokens (`int`), completion_tokens (`int`),
          truncated (`bool`), raw_text (`str`), generation_index (`int`), error (`str`),
          evidence (`list` of {start, end}: code point spans of the content the answer
          copies), grounding and question_grounding (`float`, 0 to 1: the share of the
          answer's, the question's, words copied from the content), duplicate_of (`dict`
          {id, generation}, or None: the earlier pair this one's question nearly repeats).

    Runtime parameters:
        - `target`: the server, a comma-separated list of servers or a gRPC URI.
        - `token`: the bearer token.
        - `num_generations`: pairs per document.
        - `temperature`, `top_p`, `top_k`, `min_p`, `repeat_penalty`, `presence_penalty`,
          `frequency_penalty`, `seed`, `max_tokens`, `stop`: sampling; unset, the server's.
        - `constrained`: grammar-constrained generation, every pair parses.
        - `truncate`: cut content that does not fit the context instead of failing it.
        - `concurrency`, `streams`, `deadline`, `max_attempts`, `retry_budget`: the flow.
        - `add_raw_output`: whether to keep the completion in `distilabel_metadata`.
        - `require_parsed`, `min_grounding`, `max_question_grounding`: filters, as in the
          bulk CLI; the pairs they take out go to `filtered_path` (JSONL, with
          `filter_reason`), never silently away.
        - `dedup_threshold`: with the `duplicate_of` column, how alike questions must be.

    Examples:
        ```python
        with Pipeline() as pipeline:
            docs = LoadDataFromHub(repo_id="...")
            docs >> GenstructService(target="127.0.0.1:50051", input_mappings={"content": "text"})
        ```
    """

    # Unset, the environment is read in load(): where the step runs, not where it is built.
    # (A RuntimeParameter cannot take a default_factory: it carries a default of None.) The
    # `| None` makes a parameter optional in distilabel's eyes.
    target: RuntimeParameter[str] | None = Field(
        default=None,
        description="Server address (host:port), several separated by commas (spread with "
        "round_robin), or a gRPC URI such as dns:///genstruct:50051. Unset: the "
        "GENSTRUCT_TARGET environment variable, else 127.0.0.1:50051.",
    )
    token: RuntimeParameter[SecretStr] | None = Field(
        default=None,
        description="Bearer token sent as `authorization: Bearer <token>`. Unset: the "
        "GENSTRUCT_TOKEN environment variable.",
    )
    tls: bool = Field(default=False, description="Use TLS (implied by ca_cert and cert).")
    ca_cert: RuntimeParameter[str] | None = Field(
        default=None, description="PEM file of the roots to verify the server with."
    )
    cert: RuntimeParameter[str] | None = Field(
        default=None, description="PEM client certificate file, for mutual TLS."
    )
    key: RuntimeParameter[str] | None = Field(
        default=None, description="PEM client key file, for mutual TLS."
    )
    server_name: RuntimeParameter[str] | None = Field(
        default=None, description="Name expected in the server's certificate."
    )

    num_generations: RuntimeParameter[PositiveInt] = Field(
        default=1, description="The number of pairs to generate per document."
    )
    group_generations: bool = Field(
        default=False,
        description="One row per document with a list per column, instead of a row per pair.",
    )
    temperature: RuntimeParameter[float] | None = Field(
        default=None, description="Sampling temperature. Unset: the server's default."
    )
    top_p: RuntimeParameter[float] | None = Field(
        default=None, description="Nucleus sampling. Unset: the server's default."
    )
    top_k: RuntimeParameter[int] | None = Field(
        default=None, description="Top-k sampling, 0 disables it. Unset: the server's default."
    )
    min_p: RuntimeParameter[float] | None = Field(
        default=None, description="Min-p sampling. Unset: the server's default."
    )
    repeat_penalty: RuntimeParameter[float] | None = Field(
        default=None, description="Repetition penalty. Unset: the server's default."
    )
    presence_penalty: RuntimeParameter[float] | None = Field(
        default=None, description="Presence penalty. Unset: the server's default."
    )
    frequency_penalty: RuntimeParameter[float] | None = Field(
        default=None, description="Frequency penalty. Unset: the server's default."
    )
    seed: RuntimeParameter[int] | None = Field(
        default=None, description="Sampling seed. Unset: a fresh seed per request."
    )
    max_tokens: RuntimeParameter[PositiveInt] | None = Field(
        default=None, description="Most tokens per pair. Unset: the server's default."
    )
    stop: RuntimeParameter[list[str]] | None = Field(
        default=None, description="Extra stop strings."
    )
    constrained: RuntimeParameter[bool] | None = Field(
        default=None,
        description="Constrain generation with a grammar so that every pair parses. Unset: "
        "the server's default (on when it serves the demo stand-in).",
    )
    truncate: RuntimeParameter[bool] = Field(
        default=False,
        description="Cut content that does not fit the context (the `truncated` column) "
        "instead of failing the document.",
    )

    concurrency: RuntimeParameter[PositiveInt] = Field(
        default=32, description="Documents in flight per GenerateBatch stream."
    )
    streams: RuntimeParameter[PositiveInt] | None = Field(
        default=None,
        description="GenerateBatch streams. Unset: one per address of `target`.",
    )
    deadline: RuntimeParameter[float] | None = Field(
        default=None,
        description="Seconds a document may take at the server, from when the server reads "
        "it (its wait for a slot included); past it the server stops that document only, and "
        "it is tried again (it counts as a try).",
    )
    max_attempts: RuntimeParameter[PositiveInt] = Field(
        default=5, description="Tries per document on transient failures."
    )
    retry_budget: RuntimeParameter[float] = Field(
        default=300.0,
        description="Seconds without any result after which the rest of a batch fails "
        "(servers down or unreachable).",
    )
    add_raw_output: RuntimeParameter[bool] = Field(
        default=True,
        description="Whether to include the completion in the key `raw_output_<name>` of "
        "the `distilabel_metadata` column.",
    )
    extra_columns: list[ExtraColumn] = Field(
        default_factory=list,
        description=f"Service columns to add: any of {', '.join(EXTRA_COLUMNS)}. "
        "`duplicate_of` also turns on the search for near-duplicate questions.",
    )
    require_parsed: RuntimeParameter[bool] = Field(
        default=False,
        description="Take out pairs that did not parse (reason not_parsed).",
    )
    min_grounding: RuntimeParameter[float] | None = Field(
        default=None,
        description="Take out pairs whose answer's grounding is below this, 0 to 1 (reason "
        "grounding_below_min).",
    )
    max_question_grounding: RuntimeParameter[float] | None = Field(
        default=None,
        description="Take out pairs whose question's grounding is above this, 0 to 1 (reason "
        "question_grounding_above_max).",
    )
    filtered_path: RuntimeParameter[str] | None = Field(
        default=None,
        description="JSONL file the pairs a filter takes out are appended to, each with its "
        "`filter_reason` (required with a filter: nothing is dropped without a trace).",
    )
    dedup_threshold: RuntimeParameter[float] = Field(
        default=DEFAULT_THRESHOLD,
        description="With the `duplicate_of` column: how alike two questions' word pairs "
        "must be (Jaccard) for the later to be marked as the earlier's duplicate.",
    )

    _connection: _Connection | None = PrivateAttr(default=None)
    _model_name: str | None = PrivateAttr(default=None)
    _index: QuestionIndex | None = PrivateAttr(default=None)
    _filters: Filters = PrivateAttr(default_factory=Filters)
    _rows_seen: int = PrivateAttr(default=0)  # input rows, over every batch: their ids
    _filtered: Counter[str] = PrivateAttr(default_factory=Counter)

    @property
    def inputs(self) -> "StepColumns":
        return ["title", "content"]

    @property
    def outputs(self) -> "StepColumns":
        return ["user", "assistant", "model_name", *self.extra_columns]

    def load(self) -> None:
        """Opens the channel; in distilabel's worker process, not where the step is built."""
        super().load()
        self._filters = Filters(
            require_parsed=self.require_parsed,
            min_grounding=self.min_grounding,
            max_question_grounding=self.max_question_grounding,
        )
        if self._filters.active and not self.filtered_path:
            raise ValueError(
                "GenstructService: a filter (require_parsed, min_grounding, "
                "max_question_grounding) needs filtered_path, the JSONL file the pairs it "
                "takes out go to"
            )
        if "duplicate_of" in self.extra_columns:
            self._index = QuestionIndex(self.dedup_threshold)
        self._connection = _Connection(self._channel_config())

    def unload(self) -> None:
        """Closes the channel."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        super().unload()

    def process(self, inputs: StepInput) -> "StepOutput":
        """Pairs for a batch of rows."""
        yield self._generate(inputs)

    def impute_step_outputs(self, step_output: list[Row]) -> list[Row]:
        """Error rows with this step's columns, for a batch whose `process` raised."""
        reason = "INTERNAL: the step failed on this batch (see the log)"
        # These rows skip process_applying_mappings, so the output mappings are applied here.
        return [
            {self.output_mappings.get(k, k): v for k, v in out.items()}
            for row in step_output
            for out in self._error_rows(row, reason, self._model_name)
        ]

    def _channel_config(self) -> ChannelConfig:
        tls = None
        if self.tls or self.ca_cert or self.cert or self.key:
            tls = TlsConfig.from_files(self.ca_cert, self.cert, self.key, self.server_name)
        token = self.token.get_secret_value() if self.token is not None else None
        token = token or os.environ.get("GENSTRUCT_TOKEN") or None
        return ChannelConfig(target=self._target(), tls=tls, token=token)

    def _target(self) -> str:
        return resolve_target(self.target or os.environ.get("GENSTRUCT_TARGET", DEFAULT_TARGET))

    def _options(self) -> GenerationOptions:
        return GenerationOptions(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=self.max_tokens,
            stop=tuple(self.stop or ()),
            num_generations=self.num_generations,
            constrained=self.constrained,
            truncate=self.truncate,
        )

    def _generate(self, inputs: list[Row]) -> list[Row]:
        if self._connection is None:
            raise RuntimeError("GenstructService.process called before load()")
        documents: list[Document] = []
        reasons: dict[int, str] = {}
        for i, row in enumerate(inputs):
            title = row.get("title")
            title = "" if title is None else title
            content = row.get("content")
            if isinstance(title, str) and isinstance(content, str):
                # The row's position is its id: unique in the batch, as GenerateBatch needs.
                documents.append(Document(title=title, content=content, id=str(i)))
                continue
            wrong = [
                f"{column} is {type(value).__name__}, not text"
                for column, value in (("title", title), ("content", content))
                if not isinstance(value, str)
            ]
            reasons[i] = f"INVALID_ARGUMENT: {'; '.join(wrong)}"
        responses: dict[int, pb.GenerateResponse] = {}
        failure = "UNAVAILABLE: no result"
        try:
            if documents:
                self._connection.run(self._collect(documents, responses))
        except BatchAborted as exc:
            failure = _with_details(str(exc), exc.error_details)
            self._log().warning(
                "%d of %d documents got no result: %s",
                len(documents) - len(responses),
                len(inputs),
                failure,
            )
        except Exception as exc:  # the rows say it, and the pipeline goes on
            failure = f"{type(exc).__name__}: {exc}"
            self._log().exception("GenerateBatch failed")
        for result in responses.values():
            if not result.HasField("error") and result.model_name:
                self._model_name = result.model_name
        model_name = self._model_name
        if model_name is None and len(responses) < len(inputs):
            model_name = self._known_model_name()
        rows: list[Row] = []
        filtered: list[Row] = []
        first = self._rows_seen
        self._rows_seen += len(inputs)
        for i, row in enumerate(inputs):
            response = responses.get(i)
            if response is not None and not response.HasField("error") and response.pairs:
                rows += self._pair_rows(row, response, str(first + i), filtered)
            elif response is not None:
                name = _CODE_NAMES.get(response.error.code, str(response.error.code))
                reason = _with_details(
                    f"{name}: {response.error.message}", ErrorDetails.from_status(response.error)
                )
                if not response.HasField("error"):
                    reason = "INTERNAL: a result without pairs"
                rows += self._error_rows(row, reason, response.model_name or model_name)
            else:
                rows += self._error_rows(row, reasons.get(i, failure), model_name)
        if filtered:
            self._set_aside(filtered)
        return rows

    def _set_aside(self, filtered: list[Row]) -> None:
        """Appends the pairs the filters took out to `filtered_path`, and says how many."""
        assert self.filtered_path is not None
        with open(self.filtered_path, "ab") as file:
            file.write(b"".join(encode_line(row) for row in filtered))
        reasons = Counter(str(row["filter_reason"]) for row in filtered)
        self._filtered.update(reasons)
        self._log().info(
            "%d pairs filtered out to %s (%s; %s in all)",
            len(filtered),
            self.filtered_path,
            ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items())),
            ", ".join(f"{reason} {n}" for reason, n in sorted(self._filtered.items())),
        )

    async def _collect(
        self, documents: list[Document], responses: dict[int, pb.GenerateResponse]
    ) -> None:
        assert self._connection is not None
        client = self._connection.client
        batch = client.generate_many(
            documents,
            self._options(),
            window=self.concurrency,
            streams=self.streams or target_addresses(client.config.target),
            deadline=self.deadline,
            policy=ResubmitPolicy(
                max_attempts=self.max_attempts, budget_seconds=self.retry_budget
            ),
        )
        async with contextlib.aclosing(batch):
            async for response in batch:
                responses[int(response.id)] = response

    def _pair_rows(
        self, row: Row, response: pb.GenerateResponse, row_id: str, filtered: list[Row]
    ) -> list[Row]:
        """The rows of a document's pairs; those a filter takes out go to `filtered`.
        `row_id` (the input row's number over every batch) names it in `duplicate_of`."""
        outputs = []
        for pair in response.pairs:
            # the bulk output's columns (rows.pair_columns), of which the step shows
            # distilabel's and the extra columns asked for
            columns = pair_columns(response, pair)
            reason = self._filters.reason(columns)
            if reason is not None:
                filtered.append({
                    **row, **columns, "generation_index": pair.index, "filter_reason": reason,
                })
                continue
            if self._index is not None and pair.parsed:
                earlier = self._index.check(pair.user, (row_id, pair.index))
                columns["duplicate_of"] = None if earlier is None else duplicate_key(*earlier)
            output = self._output(
                user=columns["user"],
                assistant=columns["assistant"],
                model_name=columns["model_name"],
                metadata=self._metadata(
                    row,
                    raw_output=pair.raw_text,
                    statistics={
                        "input_tokens": response.usage.prompt_tokens,
                        "output_tokens": pair.completion_tokens,
                    },
                    error=None,
                ),
                extras={**columns, "generation_index": pair.index, "error": None},
            )
            outputs.append(output)
        return self._rows(row, outputs) if outputs else []

    def _error_rows(self, row: Row, reason: str, model_name: str | None) -> list[Row]:
        """As many rows as pairs were asked for, each saying why there are none."""
        outputs = [
            self._output(
                user=None,
                assistant=None,
                model_name=model_name,
                metadata=self._metadata(row, raw_output=None, statistics=None, error=reason),
                extras={column: None for column in EXTRA_COLUMNS}
                | {"generation_index": index, "error": reason},
            )
            for index in range(self.num_generations or 1)
        ]
        return self._rows(row, outputs)

    def _output(
        self,
        *,
        user: str | None,
        assistant: str | None,
        model_name: str | None,
        metadata: Row,
        extras: Row,
    ) -> Row:
        # In the order of distilabel's Genstruct rows, then the extras asked for.
        output: Row = {
            "user": user,
            "assistant": assistant,
            DISTILABEL_METADATA_KEY: metadata,
            "model_name": model_name,
        }
        for column in self.extra_columns:
            output[column] = extras[column]
        return output

    def _rows(self, row: Row, outputs: list[Row]) -> list[Row]:
        if not self.group_generations:
            return [{**row, **output} for output in outputs]
        grouped: Row = {key: [output[key] for output in outputs] for key in outputs[0]}
        grouped["model_name"] = outputs[0]["model_name"]
        return [{**row, **grouped}]

    def _metadata(
        self,
        row: Row,
        *,
        raw_output: str | None,
        statistics: dict[str, int] | None,
        error: str | None,
    ) -> Row:
        # Keeps what earlier steps put there; every row gets the same keys, so the column
        # keeps one type in distilabel's Parquet files.
        earlier = row.get(DISTILABEL_METADATA_KEY)
        metadata: Row = dict(earlier) if isinstance(earlier, dict) else {}
        if self.add_raw_output:
            metadata[f"raw_output_{self.name}"] = raw_output
        metadata[f"statistics_{self.name}"] = statistics
        metadata[f"error_{self.name}"] = error
        return metadata

    def _known_model_name(self) -> str | None:
        """The server's model, for rows without a result: distilabel always names it."""
        if self._model_name is None and self._connection is not None:
            with contextlib.suppress(grpc.RpcError, TimeoutError):
                info = self._connection.run(
                    self._connection.client.model_info(timeout=_INFO_TIMEOUT)
                )
                self._model_name = info.model_name or None
        return self._model_name

    def _log(self) -> logging.Logger:
        logger: logging.Logger | None = self._logger
        return logger or logging.getLogger(f"distilabel.step.{self.name}")


def _with_details(text: str, details: ErrorDetails) -> str:
    """An error column's text: `CODE: message`, then the server's reason and field, if any,
    e.g. `INVALID_ARGUMENT: document.content: is empty; ... (reason FIELD_INVALID, field
    document.content)`."""
    said = [f"reason {details.reason}"] if details.reason else []
    said += [f"field {details.field}"] if details.field else []
    return f"{text} ({', '.join(said)})" if said else text
