"""A Genstruct server with the fake engine, for client tests that need a separate process.

    python -m tests.client.fake_server --port 0 [--token-delay S] [--model-name NAME] ...

`--answer TEXT` makes the assistant's side of every pair TEXT, so that replicas of one model
can be told apart by their pairs.

Prints one JSON line, {"port": <bound port>}, once it serves; SIGTERM drains, SIGKILL kills.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from pathlib import Path

from genstruct_service.config import Settings
from genstruct_service.server import start_server

from tests.fakes import DEFAULT_TOKENS, FAKE_INFO, FakeEngine, echo_tokens


async def serve(args: argparse.Namespace) -> None:
    settings = Settings(
        host="127.0.0.1",
        port=args.port,
        metrics_port=0,
        n_parallel=args.n_parallel,
        max_batch_in_flight=args.max_batch_in_flight,
        max_content_chars=args.max_content_chars,
        drain_seconds=args.drain_seconds,
        auth_token=args.auth_token,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        log_level="ERROR",
        log_format="text",
    )
    # The question and the assistant marker, then the answer.
    tokens = DEFAULT_TOKENS if args.answer is None else (
        *DEFAULT_TOKENS[: DEFAULT_TOKENS.index(" [[[Assistant]]]") + 1],
        *(f" {word}" for word in args.answer.split()),
    )
    engine = FakeEngine(
        tokens=tokens,
        tokens_for=echo_tokens if args.echo else None,
        n_parallel=args.n_parallel,
        token_delay=args.token_delay,
        info=dataclasses.replace(FAKE_INFO, model_name=args.model_name),
    )
    running = await start_server(settings, None if args.loading else engine)
    print(json.dumps({"port": running.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await running.drain()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--n-parallel", type=int, default=8)
    parser.add_argument("--max-batch-in-flight", type=int, default=16)
    parser.add_argument("--max-content-chars", type=int, default=100_000)
    parser.add_argument("--drain-seconds", type=float, default=5.0)
    parser.add_argument("--model-name", default="fake-model:Q4_K_M")
    parser.add_argument("--answer", help="the assistant's side of every pair")
    parser.add_argument(
        "--echo", action="store_true",
        help="each pair is the document's title (question) and content (answer): see "
        "tests.fakes.echo_tokens",
    )
    parser.add_argument("--auth-token")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-client-ca", type=Path)
    parser.add_argument("--loading", action="store_true", help="never load: health NOT_SERVING")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
