"""The `genstruct` command: bulk generation from files (sharded or not), the merge of shards,
and health / info for operators.

Exit codes: 0 all done (health: SERVING), 1 something failed or is left to do (health: not
SERVING or unreachable), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format

from genstruct_client._batching import ResubmitPolicy
from genstruct_client.bulk.documents import ColumnMapping, parse_columns
from genstruct_client.bulk.errors import UsageError
from genstruct_client.bulk.readers import INPUT_FORMATS
from genstruct_client.bulk.runner import RunSummary, arun
from genstruct_client.bulk.shards import COUNT_ENVS, INDEX_ENV, Shard, merge, output_for
from genstruct_client.bulk.writers import OUTPUT_FORMATS
from genstruct_client.channel import DEFAULT_TARGET, ChannelConfig, TlsConfig, resolve_target
from genstruct_client.client import GenstructClient
from genstruct_client.curation import DEDUP_MODES, DEFAULT_THRESHOLD, Curation, Filters
from genstruct_client.types import GenerationOptions

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_connection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        action="append",
        metavar="HOST:PORT",
        help="server address; repeat it (or separate with commas) for several servers, "
        "spread with round_robin; or a gRPC URI such as dns:///genstruct:50051 "
        f"(env GENSTRUCT_TARGET, default {DEFAULT_TARGET})",
    )
    group.add_argument("--tls", action="store_true", help="use TLS (implied by --ca-cert/--cert)")
    group.add_argument(
        "--ca-cert", "--ca-file", type=Path, help="PEM roots to verify the server with"
    )
    group.add_argument("--cert", type=Path, help="PEM client certificate, for mutual TLS")
    group.add_argument("--key", type=Path, help="PEM client key, for mutual TLS")
    group.add_argument("--server-name", help="name expected in the server's certificate")
    group.add_argument(
        "--token",
        help="bearer token (visible to other users in the process list: prefer --token-file "
        "or GENSTRUCT_TOKEN)",
    )
    group.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token (env GENSTRUCT_TOKEN holds it otherwise); sent "
        "as `authorization: Bearer <token>`",
    )


def _config(args: argparse.Namespace, *, retry: bool = True) -> ChannelConfig:
    targets = args.target or [os.environ.get("GENSTRUCT_TARGET", DEFAULT_TARGET)]
    try:
        target = resolve_target(",".join(targets) if len(targets) > 1 else targets[0])
        tls = None
        if args.tls or args.ca_cert or args.cert or args.key:
            tls = TlsConfig.from_files(args.ca_cert, args.cert, args.key, args.server_name)
        token = os.environ.get("GENSTRUCT_TOKEN") or None
        if args.token_file:
            token = args.token_file.read_text().strip()
        if args.token:
            token = args.token
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    if not retry:
        return ChannelConfig(target=target, tls=tls, token=token, retry=None)
    return ChannelConfig(target=target, tls=tls, token=token)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genstruct", description="Client of the Genstruct gRPC service."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="generate pairs for every document of a file, resumably",
        description="Generates instruction/response pairs for every document of INPUT into "
        "OUTPUT. Rerunning the same command resumes: what is written is skipped, each "
        "(id, generation) is written once. Parquet output is journalled to "
        "OUTPUT.journal.jsonl and converted when the run finishes.",
    )
    gen.add_argument("input", type=Path, help="JSONL, CSV, Parquet, Arrow or a datasets folder")
    gen.add_argument("-o", "--output", type=Path, required=True, help="JSONL or Parquet file")
    gen.add_argument("--input-format", choices=INPUT_FORMATS, help="default: from the suffix")
    gen.add_argument("--output-format", choices=OUTPUT_FORMATS, help="default: from the suffix")
    gen.add_argument("--split", help="split of a DatasetDict folder")
    gen.add_argument("--title-column", default="title", help="default: title")
    gen.add_argument("--content-column", default="content", help="default: content")
    gen.add_argument(
        "--id-column",
        help="column of document ids; default: the column `id` when the input has one, else "
        "ids derived from title and content (sha256), so repeated documents are processed "
        "once; '' derives them even when there is an `id` column",
    )
    gen.add_argument(
        "--columns",
        metavar="A,B=NEW,*",
        help="input columns copied to every output row: NAME, NAME=NEW_NAME (renamed), * (all "
        "the others); default: * (all); '' none. The title, content and id columns are the "
        "output's title, content and id. A column named like one of the pair's (user, "
        "assistant, model_name, ...) is refused: rename it or leave it out",
    )
    gen.add_argument(
        "--new-run",
        action="store_true",
        help="start a new output: an earlier run's files (OUTPUT, its errors, journal and "
        "OUTPUT.run.json) are renamed with the time that run started. Without it, a run "
        "resumes OUTPUT only with the configuration recorded in OUTPUT.run.json (exit 2 else)",
    )
    gen.add_argument(
        "--shard",
        metavar="I/N",
        help="only the documents whose id hashes to shard I of N (0-based: 0/4 to 3/4), "
        "whatever the input's order; OUTPUT may name {shard}, replaced by I. Default: "
        f"${INDEX_ENV} of N=${COUNT_ENVS[0]} (or ${COUNT_ENVS[1]}) when set, as in a "
        "Kubernetes Indexed Job; else every document",
    )
    gen.add_argument(
        "--errors",
        type=Path,
        help="JSONL of failed documents (default: OUTPUT's stem + .errors.jsonl)",
    )
    sampling = gen.add_argument_group("generation (unset: the server's defaults)")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--min-p", type=float)
    sampling.add_argument("--repeat-penalty", type=float)
    sampling.add_argument("--presence-penalty", type=float)
    sampling.add_argument("--frequency-penalty", type=float)
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--max-tokens", type=int)
    sampling.add_argument("--stop", action="append", default=[], help="extra stop string (repeat)")
    sampling.add_argument("--num-generations", type=int, default=1, help="pairs per document")
    sampling.add_argument(
        "--constrained",
        action=argparse.BooleanOptionalAction,
        help="grammar-constrained output: every pair parses (default: the server's, which is "
        "on when it serves the demo stand-in)",
    )
    sampling.add_argument(
        "--truncate", action="store_true", help="cut over-long content instead of failing it"
    )
    sampling.add_argument(
        "--chunk", action="store_true",
        help="split over-long content into parts, each a prompt of its own with the title: "
        "pairs from every part, rows with chunk_index, chunk_start, chunk_end and chunks",
    )
    sampling.add_argument(
        "--chunk-tokens", type=int, help="with --chunk: tokens per part (default: the server's)"
    )
    sampling.add_argument(
        "--chunk-overlap", type=int,
        help="with --chunk: tokens of whole sentences repeated from one part in the next "
        "(default: the server's)",
    )
    curation = gen.add_argument_group(
        "curation (what is taken out goes to a file of its own, with the reason)"
    )
    curation.add_argument(
        "--dedup",
        choices=DEDUP_MODES,
        default="mark",
        help="near-duplicate questions (MinHash over word pairs, within a document's "
        "generations and across the run; needs the curation extra): mark (default) sets a "
        "row's duplicate_of to the {id, generation} of the earlier pair; drop moves the row "
        "to OUTPUT's stem + .duplicates.jsonl instead; off looks for none",
    )
    curation.add_argument(
        "--dedup-threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"how alike two questions' word pairs must be (Jaccard, 0 to 1; default "
        f"{DEFAULT_THRESHOLD})",
    )
    curation.add_argument(
        "--require-parsed",
        action="store_true",
        help="take out pairs that did not parse (reason not_parsed)",
    )
    curation.add_argument(
        "--min-grounding",
        type=float,
        metavar="X",
        help="take out pairs whose answer has a grounding below X, 0 to 1 (reason "
        "grounding_below_min)",
    )
    curation.add_argument(
        "--max-question-grounding",
        type=float,
        metavar="Y",
        help="take out pairs whose question copies the document more than Y, 0 to 1 "
        "(reason question_grounding_above_max)",
    )
    curation.add_argument(
        "--no-card",
        action="store_true",
        help="write no dataset card when the run finishes (see `genstruct card`)",
    )
    flow = gen.add_argument_group("flow")
    flow.add_argument(
        "--concurrency", type=int, default=32, help="documents in flight per stream (default 32)"
    )
    flow.add_argument(
        "--streams", type=int, help="GenerateBatch streams (default: one per target address)"
    )
    flow.add_argument(
        "--deadline",
        type=float,
        help=(
            "seconds one document may take at the server, from when the server reads it (its "
            "wait for a slot included) to its result; past it the server stops that document "
            "only, which uses up one of its --max-attempts; after the last one it is recorded "
            "in OUT.errors.jsonl as DEADLINE_EXCEEDED (default: no limit)"
        ),
    )
    flow.add_argument(
        "--max-attempts", type=int, default=5, help="tries per document on transient failures"
    )
    flow.add_argument(
        "--retry-budget",
        type=float,
        default=300.0,
        help="give up when no result has come back for this many seconds (default 300)",
    )
    flow.add_argument("--no-progress", action="store_true", help="no bar, no progress lines")
    flow.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        help="seconds between progress lines when not on a terminal",
    )
    _add_connection(gen)

    merge_cmd = commands.add_parser(
        "merge",
        help="combine the outputs of finished shards into one file",
        description="Combines the outputs of every shard of a sharded run (folders: every "
        "output with an OUTPUT.run.json in them; or the output files) into one JSONL or "
        "Parquet file, each (id, generation) once. Refused (exit 2) when a shard is "
        "unfinished, missing, given twice or made with another configuration. Each shard "
        "found near-duplicate questions within itself; the merge looks across shards (as the "
        "shards' --dedup says: marked, or moved to the merged duplicates file), combines the "
        "shards' filtered, duplicates and errors files, and writes one dataset card.",
    )
    merge_cmd.add_argument("inputs", nargs="+", type=Path, help="shard outputs or their folder")
    merge_cmd.add_argument("-o", "--output", type=Path, required=True, help="JSONL or Parquet")
    merge_cmd.add_argument(
        "--output-format", choices=OUTPUT_FORMATS, help="default: from the suffix"
    )
    merge_cmd.add_argument(
        "--no-card", action="store_true", help="write no dataset card for the merged output"
    )

    card = commands.add_parser(
        "card",
        help="write the dataset card of an output",
        description="Writes a Hugging Face dataset card for OUTPUT (a finished run's or a "
        "merge's) into the folder OUTPUT's stem + .card: README.md with YAML front matter "
        "(configs, features, the model and its license, the template version, the run's "
        "fingerprint and counts) and PNG plots. A run writes it by itself when it finishes.",
    )
    card.add_argument("output", type=Path, help="the JSONL or Parquet output of a run")

    health = commands.add_parser("health", help="exit 0 only when the server is SERVING")
    health.add_argument("--service", default="", help="service to ask about (default: server)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    _add_connection(health)

    info = commands.add_parser("info", help="describe the loaded model and the limits")
    info.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    _add_connection(info)
    return parser


def _generate(args: argparse.Namespace) -> int:
    if args.num_generations < 1 or args.concurrency < 1 or args.max_attempts < 1:
        raise UsageError("--num-generations, --concurrency and --max-attempts must be >= 1")
    if args.deadline is not None and not args.deadline > 0:
        raise UsageError("--deadline must be a positive number of seconds")
    options = GenerationOptions(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        num_generations=args.num_generations,
        constrained=args.constrained,
        truncate=args.truncate,
        chunk=args.chunk,
        chunk_tokens=args.chunk_tokens,
        chunk_overlap=args.chunk_overlap,
    )
    if args.chunk and args.truncate:
        raise UsageError("--chunk and --truncate exclude each other: choose one")
    if (args.chunk_tokens is not None or args.chunk_overlap is not None) and not args.chunk:
        raise UsageError("--chunk-tokens and --chunk-overlap go with --chunk")
    try:
        curation = Curation(
            dedup=args.dedup,
            threshold=args.dedup_threshold,
            filters=Filters(
                require_parsed=args.require_parsed,
                min_grounding=args.min_grounding,
                max_question_grounding=args.max_question_grounding,
            ),
        )
    except ValueError as exc:
        raise UsageError(
            f"{exc} (--dedup-threshold, --min-grounding and --max-question-grounding are "
            "shares, 0 to 1)"
        ) from None
    config = _config(args)
    shard = Shard.parse(args.shard) if args.shard else Shard.from_env()
    output = output_for(args.output, shard)
    if shard is not None and shard.count > 1 and output == args.output and not args.shard:
        # Every pod of the Job would write the same file.
        raise UsageError(
            f"shard {shard} from ${INDEX_ENV}: the output {args.output} must name {{shard}} "
            "(e.g. -o /data/out/pairs-{shard}.jsonl) so that each shard writes its own"
        )

    async def main() -> RunSummary:
        task = asyncio.create_task(
            arun(
                args.input,
                output,
                config=config,
                options=options,
                columns=ColumnMapping(
                    args.title_column,
                    args.content_column,
                    args.id_column,
                    None if args.columns is None else parse_columns(args.columns),
                ),
                input_format=args.input_format,
                output_format=args.output_format,
                split=args.split,
                errors_path=args.errors,
                concurrency=args.concurrency,
                streams=args.streams,
                deadline=args.deadline,
                policy=ResubmitPolicy(
                    max_attempts=args.max_attempts, budget_seconds=args.retry_budget
                ),
                progress=False if args.no_progress else None,
                progress_interval=float("inf") if args.no_progress else args.progress_interval,
                new_run=args.new_run,
                shard=shard,
                curation=curation,
                card=not args.no_card,
            )
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        return await task

    summary = asyncio.run(main())
    print(summary.report(), file=sys.stderr)
    return summary.exit_code


def _merge(args: argparse.Namespace) -> int:
    summary = merge(args.inputs, args.output, args.output_format, card=not args.no_card)
    print(summary.report(), file=sys.stderr)
    return EXIT_OK


def _card(args: argparse.Namespace) -> int:
    try:
        from genstruct_client.card import write_card
    except ImportError as exc:
        raise UsageError(
            f"the dataset card needs {exc.name}: pip install 'genstruct-grpc[curation]'"
        ) from None
    if not args.output.exists():
        raise UsageError(f"{args.output} does not exist")
    print(f"dataset card: {write_card(args.output)}", file=sys.stderr)
    return EXIT_OK


def _health(args: argparse.Namespace) -> int:
    with GenstructClient(config=_config(args, retry=False)) as client:
        try:
            status = client.health(args.service, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return EXIT_FAILED
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


def _info(args: argparse.Namespace) -> int:
    # An operator asks what the server is doing now: its answer, not a retry until it changes.
    with GenstructClient(config=_config(args, retry=False)) as client:
        try:
            info = client.model_info(timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return EXIT_FAILED
    print(json.dumps(json_format.MessageToDict(info), indent=2))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    handlers = {
        "generate": _generate, "merge": _merge, "card": _card, "health": _health, "info": _info,
    }
    try:
        return handlers[args.command](args)
    except UsageError as exc:
        print(f"genstruct: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
