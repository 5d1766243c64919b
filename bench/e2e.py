"""End to end: the gRPC service against llama-server and a sequential `llama_cpp.Llama` loop.

    python -m bench.e2e [--out results.json] [--plot bench/results/e2e.png]

What is measured, on the documents the project ships (examples/documents.jsonl), the same
model (Gemma 3 270M Q4_K_M unless --model), the same threads and the same sampling:

- bulk throughput at 1, 4, 8 and 16 documents in flight: `genstruct-server` (a subprocess,
  called over gRPC from this process with GenerateStream) against llama.cpp's `llama-server
  --parallel` (HTTP /completion, streamed), and the sequential Llama loop (one document
  after another: what a plain wrapper does; its figure is the same at every level);
- time to first token (p50/p95) per level, from the client's side: the first streamed text;
- gRPC overhead: p50 of a tiny Generate through gRPC minus the same request on the engine
  directly, in one process, the two interleaved so they share the machine's state (the
  gRPC layer alone, on an engine that answers at once: tests/service/measure_overhead.py);
- peak resident memory (VmHWM) of each system's process.

End of sequence is NOT suppressed: the contract has no such switch (Sampling.ignore_eos is
engine-internal, for bench/throughput.py), so every system generates until EOS, the
Genstruct stop `[[[User]]]` or max_tokens, and tokens/s counts the tokens each actually
generated; tokens per document are printed beside it, since the systems' lengths differ.
Peers run one after another, never together. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import settings

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "documents.jsonl"
SERVER = Path(sys.executable).with_name("genstruct-server")
LEVELS = (1, 4, 8, 16)
SAMPLING = settings.SAMPLING
STOP = "[[[User]]]"  # the Genstruct stop, which the service always applies


@dataclass
class Level:
    system: str
    concurrency: int
    documents: int
    generated_tokens: int
    seconds: float
    tokens_per_second: float
    documents_per_second: float
    tokens_per_document: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    errors: int = 0


@dataclass
class Results:
    model: str
    threads: int
    max_tokens: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    levels: list[Level] = field(default_factory=list)
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)
    overhead: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def documents() -> list[dict[str, str]]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


def docs_for(concurrency: int, args: argparse.Namespace) -> int:
    """Documents sent at one level: --docs, else 4 per document in flight within the bounds,
    so every concurrency stays full while documents join and leave."""
    if args.docs:
        return int(args.docs)
    return min(max(4 * concurrency, args.min_docs), args.max_docs)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _level(system: str, concurrency: int, n_docs: int, tokens: int, seconds: float,
           ttfts: list[float], errors: int = 0) -> Level:
    return Level(system, concurrency, n_docs, tokens, seconds, tokens / seconds,
                 n_docs / seconds, tokens / max(1, n_docs - errors),
                 _percentile(ttfts, 0.5) * 1e3, _percentile(ttfts, 0.95) * 1e3, errors)


# ---------------------------------------------------------------- (a) the gRPC service


class GrpcService:
    """`genstruct-server` with the model, as a subprocess; its address from its log."""

    def __init__(
        self, args: argparse.Namespace, n_parallel: int = max(LEVELS), extra: Sequence[str] = ()
    ) -> None:
        command = [
            str(SERVER), "--model", args.model, "--port", "0", "--metrics-port", "0",
            "--n-parallel", str(n_parallel), "--n-ctx", str(args.n_ctx),
            "--n-batch", str(args.n_batch), "--n-ubatch", str(args.n_ubatch),
            "--threads", str(args.threads), "--threads-batch", str(args.threads),
            "--n-gpu-layers", str(args.n_gpu_layers), "--flash-attn", args.flash_attn,
            "--speculation", args.speculation, settings.kv_flag(args),
            "--max-batch-in-flight", str(n_parallel),
            "--log-format", "json", "--log-level", "INFO", *extra,
        ]
        self.process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
        self.target = ""
        ready = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                message = str(entry.get("msg", ""))
                if message.startswith("listening"):
                    self.target = str(entry["target"])
                elif message.startswith("ready"):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300) or self.process.poll() is not None or not self.target:
            self.stop()
            raise RuntimeError("genstruct-server did not become ready")

    def peak_rss(self) -> int:
        return settings.peak_rss(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _grpc_request(doc: dict[str, str], i: int, max_tokens: int) -> Any:
    from genstruct.v1 import genstruct_pb2 as pb

    return pb.GenerateRequest(
        id=str(i), document=pb.Document(title=doc["title"], content=doc["content"]),
        sampling=pb.SamplingParams(temperature=SAMPLING["temperature"], top_k=SAMPLING["top_k"],
                                   top_p=SAMPLING["top_p"], min_p=SAMPLING["min_p"],
                                   seed=SAMPLING["seed"] + i, max_tokens=max_tokens),
    )


async def _grpc_level(target: str, docs: list[dict[str, str]], concurrency: int, n_docs: int,
                      max_tokens: int) -> Level:
    import grpc.aio
    from genstruct.v1 import genstruct_pb2_grpc

    todo = list(range(n_docs))
    tokens = errors = 0
    ttfts: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = genstruct_pb2_grpc.GenstructServiceStub(channel)
        await stub.Generate(_grpc_request(docs[0], 0, 2), timeout=120)  # connected and warm

        async def worker() -> None:
            nonlocal tokens, errors
            while todo:
                i = todo.pop(0)
                request = _grpc_request(docs[i % len(docs)], i, max_tokens)
                sent = time.perf_counter()
                first = None
                try:
                    async for message in stub.GenerateStream(request, timeout=600):
                        if first is None and message.HasField("delta"):
                            first = time.perf_counter() - sent
                        if message.HasField("result"):
                            tokens += message.result.usage.completion_tokens
                except grpc.aio.AioRpcError as exc:
                    errors += 1
                    print(f"  gRPC error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                    continue
                ttfts.append(first if first is not None else time.perf_counter() - sent)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return _level("genstruct gRPC", concurrency, n_docs, tokens, seconds, ttfts, errors)


def run_grpc(args: argparse.Namespace, docs: list[dict[str, str]], results: Results) -> None:
    service = GrpcService(args)
    try:
        for c in args.levels:
            level = asyncio.run(_grpc_level(service.target, docs, c, docs_for(c, args),
                                            args.max_tokens))
            results.levels.append(level)
            _show(level)
        results.peak_rss_bytes["genstruct gRPC"] = service.peak_rss()
    finally:
        service.stop()


def run_grounding(args: argparse.Namespace, docs: list[dict[str, str]], results: Results) -> None:
    """The cost of evidence and grounding: two servers, one computing none
    (--grounding-min-run-tokens 0), run in turn at each level, --grounding-rounds times,
    the order swapped every round; the median tokens/s of each, and their ratio."""
    off = GrpcService(args, extra=["--grounding-min-run-tokens", "0"])
    try:
        on = GrpcService(args, extra=["--grounding-min-run-tokens", "6"])
    except BaseException:
        off.stop()
        raise
    try:
        for c in args.levels:
            rates: dict[str, list[float]] = {"off": [], "on": []}
            for round_ in range(args.grounding_rounds):
                order = [("off", off), ("on", on)]
                for name, service in order if round_ % 2 == 0 else order[::-1]:
                    level = asyncio.run(_grpc_level(service.target, docs, c, docs_for(c, args),
                                                    args.max_tokens))
                    rates[name].append(level.tokens_per_second)
            on_rate, off_rate = statistics.median(rates["on"]), statistics.median(rates["off"])
            note = (f"grounding c={c}: on {on_rate:.1f} tok/s, off {off_rate:.1f} tok/s "
                    f"(medians of {args.grounding_rounds} interleaved rounds: on "
                    f"{', '.join(f'{r:.1f}' for r in rates['on'])}; off "
                    f"{', '.join(f'{r:.1f}' for r in rates['off'])}), on/off "
                    f"{on_rate / off_rate:.3f}")
            results.notes.append(note)
            print(f"  {note}", flush=True)
    finally:
        off.stop()
        on.stop()
    results.notes.append(grounding_alone(docs))
    print(f"  {results.notes[-1]}", flush=True)


def grounding_alone(docs: list[dict[str, str]], repeat: int = 200) -> str:
    """add_grounding by itself on this corpus: a response of 4 pairs per document whose
    answers copy 20 words of the content, and 40 of their own."""
    from genstruct.v1 import genstruct_pb2 as pb
    from genstruct_service.responses import add_grounding

    cases = []
    for doc in docs:
        words = doc["content"].split()
        answer = " ".join(words[:20] + ["own"] * 40)
        pairs = [pb.Pair(user="What is it about?", assistant=answer, parsed=True, index=i)
                 for i in range(4)]
        cases.append((pb.GenerateResponse(pairs=pairs, chunks=1), doc["content"]))
    started = time.perf_counter()
    for _ in range(repeat):
        for response, content in cases:
            fresh = pb.GenerateResponse()
            fresh.CopyFrom(response)
            add_grounding(fresh, content, 6)
    seconds = (time.perf_counter() - started) / (repeat * len(cases))
    return (f"add_grounding alone: {seconds * 1e6:.0f} us per document of 4 pairs "
            f"(mean over {repeat} x {len(cases)} documents of the corpus, a copy included)")


# ---------------------------------------------------------------- (b) llama-server


def _sse_completion(port: int, body: dict[str, Any]) -> tuple[int, float | None]:
    """One streamed /completion: (tokens predicted, seconds to the first text)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    first = None
    predicted = 0
    try:
        connection.request("POST", "/completion", json.dumps(body),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"llama-server answered {response.status}: {response.read()!r}")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if first is None and event.get("content"):
                first = time.perf_counter() - sent
            if event.get("stop"):
                predicted = int(event.get("tokens_predicted", 0))
                break
    finally:
        connection.close()
    return predicted, first if first is not None else time.perf_counter() - sent


def run_llama_server(binary: Path, args: argparse.Namespace, docs: list[dict[str, str]],
                     results: Results) -> None:
    from genstruct_service.prompt import render_prompt

    from bench import llama_server

    prompts = [render_prompt(d["title"], d["content"]) for d in docs]
    with llama_server.serve(binary, args.model, n_parallel=max(LEVELS),
                            settings=settings.server_flags(args),
                            extra=["--cache-ram", "0"]) as server:
        port = int(server.url.rsplit(":", 1)[1])

        def body(i: int, max_tokens: int) -> dict[str, Any]:
            return {
                "prompt": prompts[i % len(prompts)], "n_predict": max_tokens, "stream": True,
                "cache_prompt": False, "stop": [STOP], "repeat_penalty": 1.0,
                "temperature": SAMPLING["temperature"], "top_k": SAMPLING["top_k"],
                "top_p": SAMPLING["top_p"], "min_p": SAMPLING["min_p"],
                "samplers": ["top_k", "top_p", "min_p", "temperature"],
                "seed": SAMPLING["seed"] + i,
            }

        _sse_completion(port, body(0, 2))  # warm
        for c in args.levels:
            n_docs = docs_for(c, args)
            start = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                outcomes = list(pool.map(lambda i: _sse_completion(port, body(i, args.max_tokens)),
                                         range(n_docs)))
            seconds = time.perf_counter() - start
            level = _level("llama-server", c, n_docs, sum(o[0] for o in outcomes), seconds,
                           [o[1] for o in outcomes if o[1] is not None])
            results.levels.append(level)
            _show(level)
        results.peak_rss_bytes["llama-server"] = settings.peak_rss(server.process.pid)


# ---------------------------------------------------------------- (c) the sequential loop


def worker_loop(args: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp
    from genstruct_service.prompt import render_prompt

    docs = documents()
    # one document at a time: a context for one prompt and its answer is enough
    llm = llama_cpp.Llama(args.model, verbose=False, seed=SAMPLING["seed"],
                          **{**settings.llama_kwargs(args), "n_ctx": min(args.n_ctx, 2048)})
    llm.create_completion("warm", max_tokens=2)
    n_docs = docs_for(1, args)
    tokens = 0
    ttfts = []
    start = time.perf_counter()
    for i in range(n_docs):
        doc = docs[i % len(docs)]
        sent = time.perf_counter()
        first = None
        stream = llm.create_completion(
            render_prompt(doc["title"], doc["content"]), max_tokens=args.max_tokens,
            temperature=SAMPLING["temperature"], top_k=SAMPLING["top_k"],
            top_p=SAMPLING["top_p"], min_p=SAMPLING["min_p"], repeat_penalty=1.0,
            seed=SAMPLING["seed"] + i, stop=[STOP], stream=True,
        )
        for chunk in stream:
            if first is None and chunk["choices"][0]["text"]:  # type: ignore[index]
                first = time.perf_counter() - sent
            tokens += 1  # one chunk per generated token
        ttfts.append(first if first is not None else time.perf_counter() - sent)
    seconds = time.perf_counter() - start
    level = _level("llama_cpp.Llama loop", 1, n_docs, tokens, seconds, ttfts)
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return {"level": asdict(level), "peak_rss_bytes": peak}


# ---------------------------------------------------------------- gRPC overhead


async def measure_overhead(engine: Any, n: int) -> dict[str, float]:
    """p50 of a tiny Generate through gRPC minus the same request on `engine`, interleaved,
    so the two share the machine's state; `n` pairs after 3 to warm up both paths.

    Also run by tests/service/measure_overhead.py with an engine that answers at once, for
    the cost of the gRPC layer alone (bench does not import the tests' fake engine).
    """
    import grpc.aio
    from genstruct.v1 import genstruct_pb2 as pb
    from genstruct.v1 import genstruct_pb2_grpc
    from genstruct_service.config import Settings
    from genstruct_service.engine import Completed, GenerationRequest, Sampling
    from genstruct_service.server import start_server

    settings = Settings(host="127.0.0.1", port=0, metrics_port=0, log_level="ERROR")
    server = await start_server(settings, engine)
    title, content = "Tides", "Tides are caused by the Moon."
    direct = GenerationRequest(title, content, Sampling(temperature=0, max_tokens=1))
    request = pb.GenerateRequest(document=pb.Document(title=title, content=content),
                                 sampling=pb.SamplingParams(temperature=0, max_tokens=1))
    through: list[float] = []
    alone: list[float] = []
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = genstruct_pb2_grpc.GenstructServiceStub(channel)
            for i in range(n + 3):
                t0 = time.perf_counter()
                async for event in engine.generate(direct):
                    if isinstance(event, Completed):
                        break
                t1 = time.perf_counter()
                await stub.Generate(request, timeout=60)
                t2 = time.perf_counter()
                if i >= 3:  # the first calls warm up both paths
                    alone.append(t1 - t0)
                    through.append(t2 - t1)
    finally:
        await server.stop(None)
    pairs = [b - a for a, b in zip(alone, through, strict=True)]
    return {
        "n": len(alone),
        "engine_p50_ms": statistics.median(alone) * 1e3,
        "grpc_p50_ms": statistics.median(through) * 1e3,
        "overhead_p50_ms": (statistics.median(through) - statistics.median(alone)) * 1e3,
        "paired_difference_p50_ms": statistics.median(pairs) * 1e3,
    }


def worker_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """measure_overhead on the real engine, with the benchmark's model and settings."""

    async def main() -> dict[str, Any]:
        from genstruct_service.engine.llama import LlamaEngine
        from genstruct_service.prompt import GENSTRUCT_FORMAT

        engine = await LlamaEngine.open(args.model, prompt_format=GENSTRUCT_FORMAT,
                                        n_parallel=max(LEVELS),
                                        **settings.engine_kwargs(args))
        try:
            return await measure_overhead(engine, args.overhead_n)
        finally:
            await engine.close()

    return asyncio.run(main())


def _in_subprocess(worker: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.e2e", "--worker", worker,
               "--max-tokens", str(args.max_tokens), *settings.worker_flags(args),
               "--min-docs", str(args.min_docs), "--max-docs", str(args.max_docs),
               "--overhead-n", str(args.overhead_n)]
    if args.docs:
        command += ["--docs", str(args.docs)]
    done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- report


def _show(level: Level) -> None:
    print(f"  {level.system:<22} c={level.concurrency:<3} docs={level.documents:<3} "
          f"{level.generated_tokens:>5} tok in {level.seconds:6.1f} s = "
          f"{level.tokens_per_second:7.1f} tok/s ({level.tokens_per_document:5.1f} tok/doc), "
          f"TTFT p50 {level.ttft_p50_ms:7.0f} ms p95 {level.ttft_p95_ms:7.0f} ms"
          + (f", {level.errors} errors" if level.errors else ""), flush=True)


def table(results: Results) -> str:
    def find(system: str, c: int) -> Level | None:
        return next((x for x in results.levels if x.system == system and x.concurrency == c),
                    None)

    loop = find("llama_cpp.Llama loop", 1)
    lines = []
    header = (f"{'in flight':>9} {'gRPC tok/s':>11} {'server tok/s':>13} {'loop tok/s':>11} "
              f"{'gRPC/server':>12} {'gRPC/loop':>10}   {'TTFT p50/p95 ms: gRPC':>22} "
              f"{'server':>13} {'loop':>13}")
    lines += [header, "-" * len(header)]
    levels = sorted({x.concurrency for x in results.levels if x.system != "llama_cpp.Llama loop"})
    for c in levels:
        g, s = find("genstruct gRPC", c), find("llama-server", c)

        def tps(x: Level | None) -> str:
            return f"{x.tokens_per_second:.1f}" if x else "-"

        def ratio(a: Level | None, b: Level | None) -> str:
            return f"{a.tokens_per_second / b.tokens_per_second:.2f}x" if a and b else "-"

        def ttft(x: Level | None) -> str:
            return f"{x.ttft_p50_ms:.0f}/{x.ttft_p95_ms:.0f}" if x else "-"

        lines.append(f"{c:>9} {tps(g):>11} {tps(s):>13} {tps(loop):>11} {ratio(g, s):>12} "
                     f"{ratio(g, loop):>10}   {ttft(g):>22} {ttft(s):>13} "
                     f"{ttft(loop) if c == 1 else '':>13}")
    lines.append("")
    lines.append("tokens per document (EOS not suppressed; each system's own lengths): "
                 + ", ".join(f"{x.system} c={x.concurrency}: {x.tokens_per_document:.1f}"
                             for x in results.levels))
    lines.append("peak RSS (MiB): " + ", ".join(f"{k} {v / 2**20:.0f}"
                                              for k, v in results.peak_rss_bytes.items()))
    if results.overhead:
        o = results.overhead
        lines.append(f"gRPC overhead per tiny Generate (n={o['n']:.0f}, max_tokens 1): engine "
                     f"p50 {o['engine_p50_ms']:.2f} ms, through gRPC p50 {o['grpc_p50_ms']:.2f} "
                     f"ms, difference {o['overhead_p50_ms']:.2f} ms (p50 of paired differences "
                     f"{o['paired_difference_p50_ms']:.2f} ms); the gRPC layer alone: "
                     "python -m tests.service.measure_overhead")
    lines.append(f"load average before {results.load_before}, after {results.load_after}")
    return "\n".join(lines)


def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, style in (("genstruct gRPC", "o-"), ("llama-server", "s--")):
        points = sorted((x.concurrency, x.tokens_per_second) for x in results.levels
                        if x.system == system)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=system)
    loop = [x for x in results.levels if x.system == "llama_cpp.Llama loop"]
    if loop:
        ax.axhline(loop[0].tokens_per_second, color="gray", linestyle=":",
                   label="llama_cpp.Llama loop (sequential)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(LEVELS), [str(c) for c in LEVELS])
    ax.set_xlabel("documents in flight")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"End to end, {Path(results.model).name}, {results.threads} threads, "
                 f"max_tokens {results.max_tokens}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="save a PNG of throughput against concurrency")
    settings.add_arguments(parser, n_ctx=16384)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--docs", type=int, default=None,
                        help="documents per level (default: 4 per document in flight, within "
                        "--min-docs and --max-docs)")
    parser.add_argument("--min-docs", type=int, default=8, help="documents per level, at least")
    parser.add_argument("--max-docs", type=int, default=64, help="documents per level, at most")
    parser.add_argument("--overhead-n", type=int, default=40)
    parser.add_argument("--systems", default="grpc,server,loop,overhead",
                        help="any of grpc, server, loop, overhead, grounding (the cost of "
                        "evidence and grounding: two servers, interleaved)")
    parser.add_argument("--grounding-rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings.resolve(args)
    args.levels = [int(x) for x in str(args.levels).split(",")]

    if args.worker:
        run = worker_loop if args.worker == "loop" else worker_overhead
        print(json.dumps(run(args)))
        return 0

    docs = documents()
    systems = set(args.systems.split(","))
    results = Results(args.model, args.threads, args.max_tokens, os.getloadavg())
    print(f"model {args.model}\n{len(docs)} documents in {CORPUS.relative_to(ROOT)}, "
          f"{args.threads} threads, max_tokens {args.max_tokens}, levels {args.levels}, "
          f"load {results.load_before}", flush=True)
    if "grpc" in systems:
        print("genstruct-server over gRPC:", flush=True)
        run_grpc(args, docs, results)
    if "grounding" in systems:
        print("evidence and grounding, on against off:", flush=True)
        run_grounding(args, docs, results)
    if "server" in systems:
        from bench import llama_server

        binary = llama_server.ensure_built()
        if binary is None:
            results.notes.append("llama-server could not be built: skipped")
        else:
            print("llama-server --parallel over HTTP:", flush=True)
            run_llama_server(binary, args, docs, results)
    if "loop" in systems:
        print("sequential llama_cpp.Llama loop:", flush=True)
        loop = _in_subprocess("loop", args)
        level = Level(**loop["level"])
        results.levels.append(level)
        results.peak_rss_bytes["llama_cpp.Llama loop"] = int(loop["peak_rss_bytes"])
        _show(level)
    if "overhead" in systems:
        print("gRPC overhead:", flush=True)
        results.overhead = _in_subprocess("overhead", args)
    results.load_after = os.getloadavg()
    print()
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(asdict(results), indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
