"""The bulk run: documents from a file through GenerateBatch into a resumable output.

Exactly once: the output (or its journal) and the errors file are the ledger. A rerun of the
same command skips every (id, generation) already written and every id that failed for good,
and asks again for the rest, writing only the generations still missing. One configuration:
the run record beside the output (run_record.py) refuses a rerun made with another. A sharded
run (shards.py) takes only its shard's documents; the record says when a run has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from genstruct.v1 import genstruct_pb2 as pb

from genstruct_client._batching import BatchAborted, ResubmitPolicy
from genstruct_client.aio import AsyncGenstructClient
from genstruct_client.bulk import run_record
from genstruct_client.bulk.documents import ColumnMapping
from genstruct_client.bulk.errors import UsageError
from genstruct_client.bulk.ledger import Ledger
from genstruct_client.bulk.readers import Row, count_rows, detect_input_format, read_rows
from genstruct_client.bulk.run_record import (
    RunMismatch,
    ServersUnavailable,
    agreed_fingerprint,
    move_aside,
    record_path,
    server_infos,
    started_stamp,
)
from genstruct_client.bulk.shards import Shard
from genstruct_client.bulk.writers import (
    JsonlJournal,
    Output,
    card_path,
    detect_output_format,
    journal_path,
    read_questions,
    side_path,
)
from genstruct_client.channel import ChannelConfig, target_addresses
from genstruct_client.curation import Curation, QuestionIndex
from genstruct_client.errors import ErrorDetails
from genstruct_client.progress import Progress
from genstruct_client.rows import duplicate_key, pair_columns
from genstruct_client.types import GenerationOptions

log = logging.getLogger("genstruct_client.bulk")

# Failures worth trying again on a later run: they are not written to the ledger as done.
RETRYABLE_CODES = frozenset(
    code.value[0]
    for code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    )
)
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(slots=True)
class RunSummary:
    """What a bulk run did."""

    output: Path
    errors: Path
    rows_read: int = 0  # input records read
    already_done: int = 0  # documents skipped: written (or failed for good) by an earlier run
    duplicates: int = 0  # records whose id was already seen in this input: processed once
    other_shards: int = 0  # documents of other shards (a sharded run), left to them
    succeeded: int = 0  # documents whose pairs were written in this run
    failed: int = 0  # documents written to the errors file in this run
    failed_before: int = 0  # documents skipped because an earlier run failed them for good
    retry_later: int = 0  # of failed: transient failures, tried again by a rerun
    pairs_written: int = 0
    parsed: int = 0  # of pairs_written
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_seconds: float = 0.0
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM; rerun to finish
    aborted: str | None = None  # the servers stayed unavailable; rerun to finish
    finished: bool = False  # every document was handled (written or failed)
    repaired_bytes: int = 0  # a torn last line cut off the output or errors file
    failed_codes: dict[str, int] = field(default_factory=dict)
    moved_aside: list[Path] = field(default_factory=list)  # an earlier run's files (new_run)
    # curation, in this run: pairs a filter took out (to OUT.filtered.jsonl) by reason, and
    # pairs whose question nearly repeats an earlier one (marked, or moved to
    # OUT.duplicates.jsonl with --dedup drop)
    filtered: dict[str, int] = field(default_factory=dict)
    duplicate_pairs: int = 0
    dedup: str = "mark"
    card: Path | None = None  # the dataset card written at the end, if any
    card_kept: bool = False  # the card on disk was already this output's: not written again
    card_problem: str | None = None  # why no card was written

    @property
    def record(self) -> Path:
        """The run record: the fingerprint of what the output is made with."""
        return record_path(self.output)

    @property
    def wrote_nothing(self) -> bool:
        """No file of the output changed in this run: no row, error or progress line was
        written, no torn line cut off."""
        return not (self.succeeded or self.failed or self.repaired_bytes)

    @property
    def exit_code(self) -> int:
        """0 when every document is done, else 1 (also for failures of an earlier run)."""
        return 0 if self.finished and self.failed == 0 and self.failed_before == 0 else 1

    def report(self) -> str:
        """A few lines for people."""
        lines = []
        if self.moved_aside:
            lines.append(
                f"new run: the earlier run's files were moved aside to "
                f"{', '.join(map(str, self.moved_aside))}"
            )
        lines += [
            f"{self.succeeded} documents done ({self.pairs_written} pairs, "
            f"{self.parsed} parsed) in {self.elapsed_seconds:.1f}s; "
            f"{self.completion_tokens} tokens generated "
            f"({self.completion_tokens / self.elapsed_seconds if self.elapsed_seconds else 0:.1f}"
            " tok/s)",
        ]
        if self.other_shards:
            lines.append(f"{self.other_shards} documents belong to other shards, left to them")
        if self.already_done:
            lines.append(f"{self.already_done} documents already done by an earlier run, skipped")
        if self.duplicates:
            lines.append(
                f"{self.duplicates} records repeat an id seen before (same id, or same title and "
                "content): each id is processed once"
            )
        if self.failed_before:
            lines.append(
                f"{self.failed_before} documents failed for good in an earlier run "
                f"(see {self.errors}); fix them or remove them from the input"
            )
        if self.failed:
            codes = ", ".join(f"{code} {n}" for code, n in sorted(self.failed_codes.items()))
            lines.append(f"{self.failed} documents failed ({codes}): see {self.errors}")
        if self.filtered:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.filtered.items()))
            lines.append(
                f"{sum(self.filtered.values())} pairs filtered out ({reasons}): see "
                f"{side_path(self.output, 'filtered')}"
            )
        if self.duplicate_pairs:
            where = (
                f"moved to {side_path(self.output, 'duplicates')}" if self.dedup == "drop"
                else "marked in duplicate_of"
            )
            lines.append(
                f"{self.duplicate_pairs} pairs nearly repeat an earlier pair's question: {where}"
            )
        if self.repaired_bytes:
            lines.append(f"cut off a torn last line ({self.repaired_bytes} bytes) left by a crash")
        if self.interrupted:
            lines.append("interrupted: rerun the same command to finish")
        if self.aborted:
            lines.append(f"stopped: {self.aborted}; rerun the same command to finish")
        if self.finished:
            lines.append(f"output: {self.output}")
        if self.card is not None:
            kept = " (unchanged: this run wrote nothing)" if self.card_kept else ""
            lines.append(f"dataset card: {self.card}{kept}")
        elif self.card_problem:
            lines.append(f"no dataset card: {self.card_problem}")
        return "\n".join(lines)


def output_rows(
    response: pb.GenerateResponse,
    title: str,
    content: str,
    keep: Callable[[pb.Pair], bool] | None = None,
    extras: Mapping[str, Any] | None = None,
    *,
    chunked: bool = False,
) -> list[dict[str, Any]]:
    """The output records of one result (only pairs `keep` takes, if given), each with the
    part it came from when `chunked`, then the input columns passed through (`extras`)."""
    rows = []
    for pair in response.pairs:
        if keep is not None and not keep(pair):
            continue
        part = (
            {"chunk_index": pair.chunk_index, "chunk_start": pair.chunk_start,
             "chunk_end": pair.chunk_end, "chunks": response.chunks}
            if chunked else {}
        )
        # id and generation_index first: resume reads them from the start of the line
        rows.append(
            {
                "id": response.id,
                "generation_index": pair.index,
                "title": title,
                "content": content,
                **pair_columns(response, pair),
                **part,
                **(extras or {}),
            }
        )
    return rows


def default_errors_path(output: Path) -> Path:
    return side_path(output, "errors")


def run(input_path: str | Path, output_path: str | Path, **kwargs: Any) -> RunSummary:
    """Runs `arun` in a new event loop (see there)."""
    return asyncio.run(arun(input_path, output_path, **kwargs))


async def arun(
    input_path: str | Path,
    output_path: str | Path,
    *,
    config: ChannelConfig | None = None,
    options: GenerationOptions | None = None,
    columns: ColumnMapping | None = None,
    input_format: str | None = None,
    output_format: str | None = None,
    split: str | None = None,
    errors_path: str | Path | None = None,
    concurrency: int = 32,
    streams: int | None = None,
    deadline: float | None = None,
    policy: ResubmitPolicy | None = None,
    progress: bool | None = None,
    progress_stream: TextIO | None = None,
    progress_interval: float = 10.0,
    commit_every: int = 64,
    commit_seconds: float = 1.0,
    new_run: bool = False,
    shard: Shard | None = None,
    curation: Curation | None = None,
    card: bool = True,
) -> RunSummary:
    """Generates pairs for every document of `input_path` into `output_path`, resumably.

    Raises UsageError for bad input, options or files, and RunMismatch (a UsageError) when
    the output was made with another configuration, or the servers serve another model;
    `new_run` moves an earlier run's files aside instead. Cancelling the task (Ctrl-C) stops
    the run cleanly: what was received is committed and the summary says `interrupted`.
    `concurrency` documents are in flight per stream; `streams` defaults to the number of
    addresses in the target. `progress`: None = a bar on a terminal, plain lines otherwise.
    `shard`: only the documents of that shard (shards.py), in its own output.
    `curation`: the filters and the search for near-duplicate questions (default: marked).
    `card`: write a dataset card (OUTPUT's stem + .card) when the run has finished.
    """
    started = time.monotonic()
    input_path, output_path = Path(input_path), Path(output_path)
    config = config or ChannelConfig()
    options = options or GenerationOptions()
    columns = columns or ColumnMapping()
    input_format = input_format or detect_input_format(input_path)
    output_format = output_format or detect_output_format(output_path)
    errors_file = Path(errors_path) if errors_path else default_errors_path(output_path)
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if options.num_generations < 1:
        raise UsageError("--num-generations must be at least 1")
    policy = policy or ResubmitPolicy()
    curation = curation or Curation()
    summary = RunSummary(output=output_path, errors=errors_file, dedup=curation.dedup)
    index = curation.index()  # before a file is touched: rensa may be missing

    rows = read_rows(input_path, input_format, split)
    # The columns are checked on the first row that reads (the rows before it are errors).
    head: list[Row] = []
    for row in rows:
        head.append(row)
        if row.error is None or len(head) >= 1000:
            break
    sample = head[-1].values if head and head[-1].error is None else {}
    columns = columns.resolved(sample)
    if sample:
        columns.check(sample, sparse=input_format == "jsonl")

    # What the servers run, before a file is touched or a document sent.
    answers = await _server_infos(config, policy, summary)
    if answers is None:
        summary.elapsed_seconds = time.monotonic() - started
        return summary
    current = agreed_fingerprint(answers, options, columns, curation)
    # Part of what the output is made with: a rerun with another shard would add another
    # shard's documents to it, and a merge would write them twice.
    current["shard"] = shard.record() if shard else None
    if new_run:
        summary.moved_aside = move_aside(
            _aside_names(output_path, output_format, errors_file, started_stamp(summary.record))
        )
    kept_aside = [side_path(output_path, kind) for kind in ("filtered", "duplicates")]
    ledger_files = [output_path, journal_path(output_path, output_format), errors_file,
                    *kept_aside]
    # Before a file is touched, so that a refused run changes nothing...
    run_record.check(summary.record, current, output_path, ledger_files)

    output = Output(output_path, output_format)
    journals: list[JsonlJournal] = []
    try:
        errors = JsonlJournal(errors_file)
        journals.append(errors)
        aside = {kind: JsonlJournal(path) for kind, path in
                 zip(("filtered", "duplicates"), kept_aside, strict=True)}
        journals += aside.values()
        pace = JsonlJournal(side_path(output_path, "progress"))
        journals.append(pace)
    except BaseException:
        output.close()
        for journal in journals:
            journal.close()
        raise
    try:
        # ... and again with the files locked, so that a run going on keeps its record.
        if run_record.check(summary.record, current, output_path, ledger_files):
            run_record.write(summary.record, current)
        else:
            # Not finished while it runs (a merge must not take a shard being resumed).
            run_record.mark_finished(summary.record, False)
        summary.repaired_bytes = output.journal.repaired_bytes + sum(
            journal.repaired_bytes for journal in journals
        )
        previous_errors = list(errors.records())
        # rows filtered out or moved aside are written too: a resume asks for none again
        ledger = Ledger.from_keys(
            itertools.chain(
                output.journal.row_keys(chunked=options.chunk),
                *(journal.row_keys(chunked=options.chunk) for journal in aside.values()),
            ),
            previous_errors,
        )
        if index is not None:
            # the questions kept so far, in the order they were: the index the run had
            rebuild_index(index, output.journal.path, chunked=options.chunk)
        permanent = [error for error in previous_errors if not error.get("retryable", False)]
        if len(permanent) != len(previous_errors):  # those are tried again now
            errors.rewrite(permanent)
        total = count_rows(input_path, input_format, split)
        bar = Progress(total, stream=progress_stream, bar=progress, interval=progress_interval)
        try:
            await _generate(
                rows,
                head,
                summary,
                ledger,
                output,
                errors,
                bar,
                _Curating(curation, index, aside, pace, options.chunk),
                config=config,
                options=options,
                columns=columns,
                model_name=str(current["model"]["model_name"]),
                concurrency=concurrency,
                streams=streams or target_addresses(config.target),
                deadline=deadline,
                policy=policy,
                commit_every=commit_every,
                commit_seconds=commit_seconds,
                shard=shard,
            )
        finally:
            bar.close()
        if summary.finished:
            output.finish()
            if summary.retry_later == 0:
                # Every document written or failed for good: what a merge waits for.
                run_record.mark_finished(summary.record, True)
    finally:
        output.close()
        for journal in journals:
            journal.close()
        for path in kept_aside:  # no file where the curation took nothing out
            if path.exists() and not path.stat().st_size:
                path.unlink()
        summary.elapsed_seconds = time.monotonic() - started
    if summary.finished and card:
        # What the card counts that the ledger knows: a card that gives other counts was
        # written from other files (by an earlier run, say, before a later one failed to).
        counts = {
            "pairs_generated": sum(mask.bit_count() for mask in ledger.written.values()),
            "failed_documents": len(ledger.failed),
        }
        # The card reads the whole output again: what the run held of it goes first (the
        # ledger and the index of a million rows are a few hundred MB).
        del ledger, index
        if summary.wrote_nothing and _card_is_current(summary.output, counts):
            # the same card again, for reading the whole output once more: kept as it is
            summary.card, summary.card_kept = card_path(summary.output) / "README.md", True
        else:
            _write_card(summary)
    return summary


def _card_is_current(output: Path, counts: Mapping[str, int]) -> bool:
    """card.is_current, imported when needed, as write_card is."""
    from genstruct_client.card import is_current

    return is_current(output, counts)


def _write_card(summary: RunSummary) -> None:
    """The dataset card of a finished output; a run that cannot write one still succeeded."""
    try:
        from genstruct_client.card import write_card

        summary.card = write_card(summary.output)
    except ImportError as exc:
        summary.card_problem = (
            f"{exc.name or exc} is not installed (pip install 'genstruct-grpc[curation]'), "
            f"then run `genstruct card {summary.output}`"
        )
    except (OSError, ValueError) as exc:
        summary.card_problem = f"{exc}; rerun it with `genstruct card {summary.output}`"


def rebuild_index(index: QuestionIndex, output: Path, *, chunked: bool) -> None:
    """Puts the questions an output keeps (rows not marked as duplicates) into `index`, in
    the output's order, as the run that wrote them did."""
    for (doc_id, generation, part, _), question, parsed, duplicate in read_questions(
        output, chunked=chunked
    ):
        if parsed and not duplicate:
            index.add(question, (doc_id, generation, part if chunked else None))


def _row_key(row: Mapping[str, Any], chunked: bool) -> tuple[str, int, int | None]:
    """What the index keeps of a row; its `duplicate_of` is rows.duplicate_key(*key)."""
    return (
        str(row["id"]), int(row["generation_index"]),
        int(row.get("chunk_index") or 0) if chunked else None,
    )


@dataclass(slots=True)
class _Curating:
    """Where each row of a run goes: the filters, then the index of questions."""

    curation: Curation
    index: QuestionIndex | None
    aside: dict[str, JsonlJournal]  # "filtered" and "duplicates"
    pace: JsonlJournal  # the run's progress, a line per commit
    chunked: bool

    def place(self, record: dict[str, Any], summary: RunSummary) -> JsonlJournal | None:
        """The journal that takes `record` instead of the output (None: the output), with
        the record marked: `filter_reason`, or `duplicate_of`."""
        reason = self.curation.filters.reason(record)
        if reason is not None:
            record["filter_reason"] = reason
            summary.filtered[reason] = summary.filtered.get(reason, 0) + 1
            return self.aside["filtered"]
        if self.index is None or not record["parsed"]:
            return None
        earlier = self.index.check(record["user"], _row_key(record, self.chunked))
        if earlier is None:
            return None
        record["duplicate_of"] = duplicate_key(*earlier)
        summary.duplicate_pairs += 1
        return self.aside["duplicates"] if self.curation.dedup == "drop" else None

    def commit(self, summary: RunSummary, started: float) -> None:
        for journal in self.aside.values():
            journal.commit()
        if not (summary.succeeded or summary.failed):
            return  # no progress: a run that handled no document leaves no line
        self.pace.append({
            "started": started,
            "time": time.time(),
            "documents": summary.succeeded,
            "pairs": summary.pairs_written,
            "completion_tokens": summary.completion_tokens,
        })
        self.pace.commit()


async def _server_infos(
    config: ChannelConfig, policy: ResubmitPolicy, summary: RunSummary
) -> dict[str, pb.GetModelInfoResponse] | None:
    """GetModelInfo of the servers; None when the run stops here (the summary says why)."""
    try:
        return await server_infos(config, policy)
    except ServersUnavailable as exc:
        summary.aborted = str(exc)
    except asyncio.CancelledError:
        _interrupted(summary)
    return None


def _interrupted(summary: RunSummary) -> None:
    """Ctrl-C (or a cancelled task) stops the run; the summary says so and the run ends
    normally, writing what it has."""
    summary.interrupted = True
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _aside_names(output: Path, fmt: str, errors: Path, stamp: str) -> list[tuple[Path, Path]]:
    """(old, new) names of an earlier run's files that exist: OUTPUT gets the stamp before
    its suffix, and the others the names that output's own would have (a default errors
    file, the journal, the record), so the moved run stays whole and resumable."""

    def tagged(path: Path, tag: str) -> Path:
        return path.with_name(f"{path.stem}.{tag}{path.suffix}")

    counter = 1
    while True:
        tag = stamp if counter == 1 else f"{stamp}-{counter}"
        moved = tagged(output, tag)
        pairs = {
            output: moved,
            journal_path(output, fmt): journal_path(moved, fmt),
            errors: default_errors_path(moved)
            if errors == default_errors_path(output)
            else tagged(errors, tag),
            record_path(output): record_path(moved),
            **{side_path(output, kind): side_path(moved, kind)
               for kind in ("filtered", "duplicates", "progress")},
            card_path(output): card_path(moved),
        }
        if not any(new.exists() for new in pairs.values()):
            return [(old, new) for old, new in pairs.items() if old.exists()]
        counter += 1


async def _generate(
    rows: Iterator[Row],
    head: list[Row],
    summary: RunSummary,
    ledger: Ledger,
    output: Output,
    errors: JsonlJournal,
    bar: Progress,
    curating: _Curating,
    *,
    config: ChannelConfig,
    options: GenerationOptions,
    columns: ColumnMapping,
    model_name: str,
    concurrency: int,
    streams: int,
    deadline: float | None,
    policy: ResubmitPolicy | None,
    commit_every: int,
    commit_seconds: float,
    shard: Shard | None = None,
) -> None:
    n = options.num_generations
    seen: set[str] = set()
    # id -> (title, content, the columns passed through) of the documents sent
    waiting: dict[str, tuple[str, str, dict[str, Any]]] = {}

    def fail(
        doc_id: str, code: int, message: str, row: int | None = None,
        details: ErrorDetails | None = None,
    ) -> None:
        retryable = code in RETRYABLE_CODES
        details = details or ErrorDetails()
        record: dict[str, Any] = {
            "id": doc_id,
            "code": _CODE_NAMES.get(code, str(code)),
            "message": message,
            # the server's ErrorReason and the request field it named (None when it did not)
            "reason": details.reason,
            "field": details.field,
            "retryable": retryable,
        }
        if row is not None:
            record["row"] = row
        errors.append(record)
        if not retryable:
            ledger.failed.add(doc_id)
        else:
            summary.retry_later += 1
        summary.failed += 1
        summary.failed_codes[record["code"]] = summary.failed_codes.get(record["code"], 0) + 1
        errors.flush()
        bar.update(failed=True)

    def documents() -> Iterator[pb.GenerateRequest]:
        for row in itertools.chain(head, rows):
            summary.rows_read += 1
            if row.error is not None:
                row_id = f"row:{row.number}"
                if shard is not None and not shard.takes(row_id):
                    summary.other_shards += 1  # an unreadable row has no id: its number's
                    bar.skip()
                    continue
                if row_id in ledger.failed:
                    summary.already_done += 1
                    summary.failed_before += 1
                    bar.skip()
                else:
                    fail(row_id, grpc.StatusCode.INVALID_ARGUMENT.value[0], row.error, row.number)
                continue
            document = columns.document(row.values)
            if shard is not None and not shard.takes(document.id):
                summary.other_shards += 1
                bar.skip()
                continue
            try:
                extras = columns.extras(row.values, row.number)
            except UsageError as exc:  # this row's own column names: its error, not the run's
                if document.id in ledger.failed:
                    summary.already_done += 1
                    summary.failed_before += 1
                    bar.skip()
                else:
                    fail(document.id, grpc.StatusCode.INVALID_ARGUMENT.value[0], str(exc),
                         row.number)
                continue
            if document.id in seen:
                summary.duplicates += 1
                bar.skip()
                continue
            seen.add(document.id)
            if ledger.is_done(document.id, n):
                summary.already_done += 1
                summary.failed_before += document.id in ledger.failed
                bar.skip()
                continue
            waiting[document.id] = (document.title, document.content, extras)
            yield options.request(document)

    last_commit = time.monotonic()
    run_started = time.time()
    written = 0  # results since the last fsync
    async with AsyncGenstructClient(config=config) as client:
        try:
            results = client.generate_many(
                documents(), window=concurrency, streams=streams, deadline=deadline, policy=policy
            )
            async with contextlib.aclosing(results):
                async for response in results:
                    title, content, extras = waiting.pop(response.id, ("", "", {}))
                    if response.HasField("error"):
                        error = response.error
                        fail(response.id, error.code, error.message,
                             details=ErrorDetails.from_status(error))
                    else:
                        if response.model_name and response.model_name != model_name:
                            # A server changed behind the target (a rolling update, a
                            # replica the check before the run could not reach).
                            raise RunMismatch(
                                f"a server answered with model {response.model_name!r}, but "
                                f"{output.path} is made with {model_name!r}: stopped, and "
                                "its pairs were not written; point --target at servers of "
                                f"{model_name!r} to go on, or pass --new-run"
                            )
                        doc_id = response.id

                        def new(pair: pb.Pair, doc_id: str = doc_id) -> bool:
                            return not ledger.has(doc_id, pair.index, pair.chunk_index)

                        records = output_rows(
                            response, title, content, new, extras, chunked=options.chunk
                        )
                        if options.chunk:
                            ledger.parts[doc_id] = response.chunks
                        for record in records:
                            journal = curating.place(record, summary) or output.journal
                            journal.append(record)
                            ledger.record(doc_id, record["generation_index"],
                                          record.get("chunk_index", 0))
                        for journal in (*curating.aside.values(), output.journal):
                            journal.flush()
                        parsed = sum(1 for record in records if record["parsed"])
                        summary.succeeded += 1
                        summary.pairs_written += len(records)
                        summary.parsed += parsed
                        summary.prompt_tokens += response.usage.prompt_tokens
                        summary.completion_tokens += response.usage.completion_tokens
                        bar.update(
                            tokens=response.usage.completion_tokens,
                            pairs=len(records),
                            parsed=parsed,
                        )
                    written += 1
                    now = time.monotonic()
                    if written >= commit_every or now - last_commit >= commit_seconds:
                        output.journal.commit()
                        errors.commit()
                        curating.commit(summary, run_started)
                        last_commit, written = now, 0
            summary.finished = True
        except BatchAborted as exc:
            summary.aborted = str(exc)
        except asyncio.CancelledError:
            _interrupted(summary)
        finally:
            output.journal.commit()
            errors.commit()
            curating.commit(summary, run_started)
