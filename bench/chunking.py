"""Long documents: parts and pairs per document with TRUNCATION_CHUNK, and time against
TRUNCATION_TRUNCATE, through `genstruct-server` over gRPC.

    python -m bench.chunking [--n-ctx 4096] [--n-parallel 4] [--max-tokens 64]

The documents are the project's own text joined into long ones: every document of
examples/documents.jsonl as one, and bench/corpus.py's repeated one to four times, so
each is longer than the context by a known factor. Each is sent once chunked and once
truncated (greedy, the same max_tokens), one document at a time; the table gives its
characters, the parts and pairs chunking made, and seconds per document for both.
This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from genstruct.v1 import genstruct_pb2, genstruct_pb2_grpc

from bench import settings
from bench.corpus import DOCUMENTS
from bench.e2e import GrpcService

ROOT = Path(__file__).resolve().parents[1]


def long_documents() -> list[tuple[str, str]]:
    examples = [json.loads(line) for line in
                (ROOT / "examples" / "documents.jsonl").read_text().splitlines()]
    docs = [("All examples", "\n\n".join(e["content"] for e in examples))]
    corpus = "\n\n".join(d.content for d in DOCUMENTS)
    docs += [(f"Corpus x{k}", "\n\n".join([corpus] * k)) for k in (1, 2, 4)]
    return docs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    settings.add_arguments(parser, n_ctx=4096)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n-parallel", type=int, default=4)
    args = parser.parse_args(argv)
    settings.resolve(args)
    print(f"model {args.model}\nthreads {args.threads}, n_ctx {args.n_ctx}, n_parallel "
          f"{args.n_parallel}, greedy, max_tokens {args.max_tokens}; load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    service = GrpcService(args, n_parallel=args.n_parallel)
    try:
        with grpc.insecure_channel(service.target) as channel:
            stub = genstruct_pb2_grpc.GenstructServiceStub(channel)
            print(f"{'document':<14}{'chars':>8}{'prompt tok':>11}{'parts':>7}{'pairs':>7}"
                  f"{'chunk s':>9}{'truncate s':>12}{'ratio':>8}")
            for title, content in long_documents():
                seconds = {}
                responses = {}
                for mode in (genstruct_pb2.TRUNCATION_CHUNK, genstruct_pb2.TRUNCATION_TRUNCATE):
                    request = genstruct_pb2.GenerateRequest(
                        document=genstruct_pb2.Document(title=title, content=content),
                        sampling=genstruct_pb2.SamplingParams(
                            temperature=0.0, max_tokens=args.max_tokens
                        ),
                        truncation=mode,
                    )
                    began = time.perf_counter()
                    responses[mode] = stub.Generate(request, timeout=3600)
                    seconds[mode] = time.perf_counter() - began
                chunked = responses[genstruct_pb2.TRUNCATION_CHUNK]
                cut = genstruct_pb2.TRUNCATION_TRUNCATE
                print(f"{title:<14}{len(content):>8}{chunked.usage.prompt_tokens:>11}"
                      f"{chunked.chunks:>7}{len(chunked.pairs):>7}"
                      f"{seconds[genstruct_pb2.TRUNCATION_CHUNK]:>9.1f}{seconds[cut]:>12.1f}"
                      f"{seconds[genstruct_pb2.TRUNCATION_CHUNK] / seconds[cut]:>7.1f}x",
                      flush=True)
    finally:
        service.stop()
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
