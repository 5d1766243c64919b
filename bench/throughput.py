"""Generated tokens per second: this engine against a sequential `Llama` loop and llama-server.

    python -m bench.throughput [--out results.json] [--model synthetic:4] [--repeat 3]

Every system gets the same Genstruct prompts (bench/corpus.py), the same model, threads,
context, batch sizes, offload, flash attention (bench/settings.py) and sampling, and
generates exactly `--max-tokens` tokens per generation (end of sequence suppressed), so
tokens/s compare like for like. Scenarios: 1, 4, 8 and 16 documents in flight, and one document
at a time with 4 generations each, by default; `--scenarios` takes any others; each sends
`--docs` documents (default 4 per slot in flight, at least 12), so every slot stays busy to
the end. Each system runs in its own process (engine, loop) or is a separate server
(llama-server), one after another, never together; peak RSS is that process's high-water
mark. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import settings
from bench.corpus import DOCUMENTS, Document
from bench.gpu_memory import PeakGpuMemory


@dataclass(frozen=True)
class Scenario:
    concurrency: int  # documents in flight
    num_generations: int

    @property
    def name(self) -> str:
        return f"c{self.concurrency}n{self.num_generations}"


DEFAULT_SCENARIOS = "c1n1,c4n1,c8n1,c16n1,c1n4"


def parse_scenarios(text: str) -> list[Scenario]:
    """`c8n1,c1n4`: documents in flight and generations per document, in the order given."""
    chosen = []
    for name in filter(None, text.split(",")):
        found = re.fullmatch(r"c([1-9]\d*)n([1-9]\d*)", name)
        if found is None:
            raise argparse.ArgumentTypeError(
                f"scenario {name!r}: write c<documents in flight>n<generations>, e.g. c8n1")
        chosen.append(Scenario(int(found[1]), int(found[2])))
    if not chosen:
        raise argparse.ArgumentTypeError("no scenario given")
    return chosen

SAMPLING = settings.SAMPLING


@dataclass
class Record:
    system: str
    concurrency: int
    num_generations: int
    generated_tokens: int
    seconds: float
    tokens_per_second: float
    peak_rss_bytes: int
    draft_tokens: int = 0  # the engine's speculation: drafted tokens verified
    accepted_draft_tokens: int = 0
    # the device's memory in use at its peak while this peer ran (None without nvidia-smi)
    peak_gpu_memory_bytes: int | None = None


def documents(scenario: Scenario, args: argparse.Namespace) -> list[Document]:
    """The corpus repeated to `--docs` documents (default: 4 per document in flight)."""
    n = args.docs or max(len(DOCUMENTS), 4 * scenario.concurrency)
    return [DOCUMENTS[i % len(DOCUMENTS)] for i in range(n)]


def prompts(scenario: Scenario, args: argparse.Namespace) -> list[str]:
    from genstruct_service.prompt import render_prompt

    return [render_prompt(d.title, d.content) for d in documents(scenario, args)]


def _self_peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------- (a) this engine


async def drive(engine: Any, requests: list[Any], in_flight: int) -> tuple[list[Any], float]:
    """Send `requests` with `in_flight` at a time; their Completed events and the seconds the
    whole took. The engine is closed afterwards."""
    todo = list(reversed(requests))
    done: list[Any] = []

    async def worker() -> None:
        while todo:
            async for event in engine.generate(todo.pop()):
                if hasattr(event, "generations"):
                    done.append(event)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    seconds = time.perf_counter() - start
    await engine.close()
    return done, seconds


def run_engine(model: str, scenario: Scenario, args: argparse.Namespace) -> Record:
    from genstruct_service.engine import GenerationRequest, Sampling
    from genstruct_service.engine.llama import LlamaEngine
    from genstruct_service.prompt import GENSTRUCT_FORMAT

    slots = scenario.concurrency * scenario.num_generations
    docs = documents(scenario, args)
    engine = LlamaEngine(
        model, prompt_format=GENSTRUCT_FORMAT, n_parallel=slots, max_queue=len(docs),
        **settings.engine_kwargs(args),
    )
    sampling = Sampling(
        temperature=SAMPLING["temperature"], top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"],
        min_p=SAMPLING["min_p"], seed=None if args.unseeded else SAMPLING["seed"],
        max_tokens=args.max_tokens,
        ignore_eos=True,
    )
    # as Generate and GenerateBatch ask: the final result only, no text as it goes
    requests = [
        GenerationRequest(d.title, d.content, sampling, num_generations=scenario.num_generations,
                          stream=False)
        for d in docs
    ]

    done, seconds = asyncio.run(drive(engine, requests, scenario.concurrency))
    generated = sum(d.completion_tokens for d in done)
    return Record("engine", scenario.concurrency, scenario.num_generations, generated, seconds,
                  generated / seconds, _self_peak_rss(),
                  sum(d.draft_tokens for d in done), sum(d.accepted_draft_tokens for d in done))


# ---------------------------------------------------------------- (b) sequential Llama loop


def run_loop(model: str, scenario: Scenario, args: argparse.Namespace) -> Record:
    import llama_cpp

    llm = llama_cpp.Llama(model, verbose=False, seed=SAMPLING["seed"],
                          **settings.llama_kwargs(args))
    vocab = llm._model.vocab  # the bindings' handle, to find the end-of-generation tokens
    eog = {t: float("-inf") for t in range(llm.n_vocab())
           if llama_cpp.llama_vocab_is_eog(vocab, t)}
    generated = 0
    start = time.perf_counter()
    # A plain wrapper serialises everything: documents and generations one after another.
    for prompt in prompts(scenario, args):
        for i in range(scenario.num_generations):
            out = llm.create_completion(
                prompt, max_tokens=args.max_tokens, temperature=SAMPLING["temperature"],
                top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"], min_p=SAMPLING["min_p"],
                repeat_penalty=1.0, seed=SAMPLING["seed"] + i, logit_bias=eog,
            )
            generated += out["usage"]["completion_tokens"]  # type: ignore[index]
    seconds = time.perf_counter() - start
    return Record("llama_cpp.Llama loop", scenario.concurrency, scenario.num_generations,
                  generated, seconds, generated / seconds, _self_peak_rss())


# ---------------------------------------------------------------- (c) llama-server


def run_server(
    binary: Path, model: str, scenario: Scenario, args: argparse.Namespace, *, n_cmpl: bool
) -> Record:
    from bench import llama_server

    slots = scenario.concurrency * scenario.num_generations
    body_base = {
        "n_predict": args.max_tokens, "ignore_eos": True, "cache_prompt": False,
        "temperature": SAMPLING["temperature"], "top_k": SAMPLING["top_k"],
        "top_p": SAMPLING["top_p"], "min_p": SAMPLING["min_p"], "repeat_penalty": 1.0,
        "samplers": ["top_k", "top_p", "min_p", "temperature"], "stream": False,
    }
    calls: list[dict[str, object]] = []

    def seed(i: int) -> dict[str, object]:
        return {} if args.unseeded else {"seed": SAMPLING["seed"] + i}

    for prompt in prompts(scenario, args):
        if n_cmpl:
            calls.append({**body_base, "prompt": prompt, **seed(0),
                          "n_cmpl": scenario.num_generations})
        else:
            calls.extend({**body_base, "prompt": prompt, **seed(i)}
                         for i in range(scenario.num_generations))
    in_flight = scenario.concurrency if n_cmpl else slots
    with PeakGpuMemory() as peak, llama_server.serve(
        binary, model, n_parallel=slots, settings=settings.server_flags(args),
        extra=["--cache-ram", "0"],
    ) as server:
        generated = 0
        lock = threading.Lock()

        def call(body: dict[str, object]) -> None:
            nonlocal generated
            result = server.post("/completion", body)
            items: list[dict[str, Any]] = result if isinstance(result, list) else [result]
            n = sum(int(r.get("tokens_predicted", 0)) for r in items)
            with lock:
                generated += n

        start = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            list(pool.map(call, calls))
        seconds = time.perf_counter() - start
        rss = settings.peak_rss(server.process.pid)
    system = "llama-server n_cmpl" if n_cmpl else "llama-server"
    return Record(system, scenario.concurrency, scenario.num_generations, generated, seconds,
                  generated / seconds, rss, peak_gpu_memory_bytes=peak.bytes)


# ---------------------------------------------------------------- driver


def _in_subprocess(system: str, scenario: Scenario, args: argparse.Namespace) -> Record:
    """Run one in-process peer in a fresh interpreter, so its peak RSS is its own."""
    command = [
        sys.executable, "-m", "bench.throughput", "--worker", system,
        "--scenario", f"{scenario.concurrency},{scenario.num_generations}",
        "--max-tokens", str(args.max_tokens), *settings.worker_flags(args),
    ]
    if args.docs:
        command += ["--docs", str(args.docs)]
    if args.unseeded:
        command.append("--unseeded")
    with PeakGpuMemory() as peak:
        done = subprocess.run(command, check=True, capture_output=True, text=True)
    record = Record(**json.loads(done.stdout.strip().splitlines()[-1]))
    record.peak_gpu_memory_bytes = peak.bytes
    return record


def _print_table(records: list[Record]) -> None:
    def find(system: str, s: Scenario) -> Record | None:
        runs = [
            r for r in records
            if r.system == system
            and (r.concurrency, r.num_generations) == (s.concurrency, s.num_generations)
        ]
        if not runs:
            return None
        # the median run (the lower middle one when even): one slow or lucky run moves nothing
        return sorted(runs, key=lambda r: r.tokens_per_second)[(len(runs) - 1) // 2]

    print()
    header = (f"{'scenario':<22}{'engine tok/s':>13}{'loop tok/s':>12}{'server tok/s':>14}"
              f"{'n_cmpl tok/s':>14}{'eng/loop':>10}{'eng/server':>12}{'eng/n_cmpl':>12}")
    print(header)
    print("-" * len(header))
    for s in sorted({Scenario(r.concurrency, r.num_generations) for r in records},
                    key=lambda s: (s.num_generations, s.concurrency)):
        engine = find("engine", s)
        loop = find("llama_cpp.Llama loop", s) or find(
            "llama_cpp.Llama loop", Scenario(1, s.num_generations))
        server = find("llama-server", s)
        n_cmpl = find("llama-server n_cmpl", s)

        def tps(r: Record | None) -> str:
            return f"{r.tokens_per_second:.1f}" if r else "-"

        def ratio(a: Record | None, b: Record | None) -> str:
            return f"{a.tokens_per_second / b.tokens_per_second:.2f}x" if a and b else "-"

        label = f"{s.concurrency} doc(s), n={s.num_generations}"
        print(f"{label:<22}{tps(engine):>13}{tps(loop):>12}{tps(server):>14}{tps(n_cmpl):>14}"
              f"{ratio(engine, loop):>10}{ratio(engine, server):>12}{ratio(engine, n_cmpl):>12}")
    print()
    print("peak RSS (MiB):")
    for r in records:
        print(f"  {r.system:<22} c={r.concurrency} n={r.num_generations}: "
              f"{r.peak_rss_bytes / 2**20:8.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    settings.add_arguments(parser, n_ctx=None)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--docs", type=int, default=None,
                        help="documents per scenario (default: 4 per document in flight, at "
                        "least 12)")
    parser.add_argument("--unseeded", action="store_true",
                        help="requests carry no seed, as most callers send them (under "
                        "--speculation auto the engine then drafts them beside others by its "
                        "live plan; seeded sampled requests are drafted only when alone)")
    parser.add_argument("--systems", default="engine,loop,server",
                        help="comma-separated subset of engine,loop,server")
    parser.add_argument("--scenarios", type=parse_scenarios,
                        default=parse_scenarios(DEFAULT_SCENARIOS),
                        help=f"comma-separated c<in flight>n<generations> (default "
                        f"{DEFAULT_SCENARIOS})")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run everything this many times, the peers interleaved; the table "
                        "shows each one's median run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.requested_n_ctx = args.n_ctx
    settings.resolve(args)

    if args.worker:
        c, n = (int(x) for x in args.scenario.split(","))
        run = run_engine if args.worker == "engine" else run_loop
        print(json.dumps(asdict(run(args.model, Scenario(c, n), args))))
        return 0

    systems = set(args.systems.split(","))
    print(f"model {args.model}\nthreads {args.threads}, n_ctx {args.n_ctx or '1024 per slot'}, "
          f"n_batch "
          f"{args.n_batch}, n_ubatch {args.n_ubatch}, n_gpu_layers {args.n_gpu_layers}, "
          f"flash attention {args.flash_attn}, "
          f"KV cache {'unified' if args.kv_unified else 'a stream per slot'}, "
          f"{args.max_tokens} tokens per generation, "
          f"engine speculation {args.speculation}, "
          f"{'unseeded' if args.unseeded else 'seeded'} requests, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    records: list[Record] = []
    binary = None
    if "server" in systems:
        from bench import llama_server

        binary = llama_server.ensure_built()
    for _, scenario in [(r, s) for r in range(args.repeat) for s in args.scenarios]:
        s, args = scenario, sized(args, scenario)
        if "engine" in systems:
            _keep(records, _in_subprocess("engine", s, args), args.out)
        if "loop" in systems and s.concurrency == 1:
            _keep(records, _in_subprocess("loop", s, args), args.out)
        if binary is not None:
            _keep(records, run_server(binary, args.model, s, args, n_cmpl=False), args.out)
            if s.num_generations > 1:
                _keep(records, run_server(binary, args.model, s, args, n_cmpl=True), args.out)
    _print_table(records)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def sized(args: argparse.Namespace, scenario: Scenario) -> argparse.Namespace:
    """The settings of one scenario: unless --n-ctx is given, 1,024 tokens of KV cache per
    slot (a corpus prompt and its generation fit), the same for every system."""
    slots = scenario.concurrency * scenario.num_generations
    n_ctx = args.requested_n_ctx or slots * 1024
    return argparse.Namespace(**{**vars(args), "n_ctx": n_ctx})


def _keep(records: list[Record], record: Record, out: Path | None) -> None:
    """Print a record as soon as it is measured, and rewrite the JSON file with it."""
    records.append(record)
    print(record, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
