"""Speculation: the engine with and without drafts, against llama-server's ngram speculation.

    python -m bench.speculation [--levels 1,8] [--repeat 3] [--server-specs none,ngram-mod]

Acceptance depends on what the model writes, so this runs real text: greedy decoding (or,
with `--sampled`, the sampling of bench/settings.py, seeded, or not with `--unseeded`: a
seeded request alone is planned from itself, an unseeded one live), the end of sequence
allowed, the Genstruct stop `[[[User]]]` for every system (with `--fixed-length`, neither:
every text runs to --max-tokens), and the same documents
(bench/corpus.py, then examples/documents.jsonl; `--documents` a JSON Lines file of title
and content instead) at every level. bench/heldout.jsonl holds the 16 documents the
acceptance tables of engine/speculation.py were measured on; bench/unseen.jsonl 12 written
after, which no table or setting has seen: give figures of the planner on these. Systems:

- `engine:off`, `engine:auto`, `engine:always`: LlamaEngine with `--speculation` so set
  (each in a fresh process);
- `server:none` and `server:<spec>`: llama-server, with no speculation or one of its
  `--spec-type ngram-*` settings (SERVER_SPECS; `--server-specs` picks), on the very
  libraries the bindings load (bench/llama_server.py).

Every system gets the same model, threads, context and batch sizes (bench/settings.py).
Peers run one after another, never together, and `--repeat` interleaves whole rounds, each
in the reverse order of the one before (`round_order`); the table gives each one's median
round, generated tokens per second, and drafted / accepted tokens. A second table gives the
decode speed: generated tokens over the seconds each request spent decoding (its first token
to its end; llama-server's `predicted_ms`). Drafts change only that part: the prompts are
the same work for every system, yet they take a large share of a run's seconds on a CPU, and
a system whose text ends sooner has fewer tokens to spread them over. A third, with
`--repeat`, pairs each run with engine:off and the best n-gram setting of its own round
(`paired_table`). With `--check-text` it also counts the documents whose text `engine:auto`
and `engine:off` write alike. This is a benchmark, not a test.

`--each-alone` (1 in flight) starts every system afresh for each document and sums the runs,
so that no request draws on what an earlier one wrote. llama-server's `ngram-mod` keeps one
n-gram pool for all its slots and requests; the engine plans a repeatable request alone from
that request only (its seed contract), and an unseeded one from acceptance it learned on
earlier requests, which this takes away from it too. On `--fixed-length` Gemma 3 270M texts, whose
documents run into the same numbered loops, the pool lets a later document draft an earlier
one's text: greedy, 12 documents of bench/unseen.jsonl, AMD EPYC, `ngram-mod` drafted 1,317
tokens in one server and 285 with a server per document.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from genstruct_service.engine.speculation import SpeculationSettings

from bench import settings
from bench.corpus import DOCUMENTS, Document
from bench.throughput import drive

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "documents.jsonl"
STOP = "[[[User]]]"
T = TypeVar("T")
# llama-server's ngram settings: its defaults, and ones sized like the engine's drafts
SERVER_SPECS: dict[str, list[str]] = {
    "none": [],
    "ngram-simple": ["--spec-type", "ngram-simple"],
    "ngram-mod": ["--spec-type", "ngram-mod"],
    "ngram-map-k": ["--spec-type", "ngram-map-k"],
    "ngram-simple-3-16": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                          "--spec-ngram-simple-size-m", "16"],
    "ngram-mod-8-16": ["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "8",
                       "--spec-ngram-mod-n-min", "1", "--spec-ngram-mod-n-max", "16"],
}


@dataclass
class Run:
    system: str
    in_flight: int
    documents: int
    generated_tokens: int
    seconds: float
    drafted: int
    accepted: int
    texts: list[str] = field(default_factory=list)
    # the engine's: step seconds by batch rows as timed before serving, and its drafts by the
    # length of the match they came from: match -> [drafts, drafted, compared, accepted]
    # (drafts borrowed from other requests' texts under -match)
    step_costs: dict[int, float] = field(default_factory=dict)
    by_match: dict[int, list[int]] = field(default_factory=dict)
    # the sum over requests of the seconds from its first token to its end
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of one request while it decodes, over all of them."""
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0


def read_documents(path: Path) -> list[Document]:
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [Document(r["title"], r["content"]) for r in records]


def documents(n: int, path: Path | None = None, only: int | None = None) -> list[Document]:
    """The first `n` of the file given, or of the corpus followed by the examples; with
    `only`, that one of them."""
    docs = read_documents(path) if path else [*DOCUMENTS, *read_documents(EXAMPLES)]
    return docs[:n] if only is None else docs[:n][only : only + 1]


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy, or with --sampled the sampling every benchmark uses (bench/settings.py), with
    its seed or, with --unseeded, none (each system then draws its own)."""
    fixed = {"ignore_eos": True} if args.fixed_length else {}
    if not args.sampled:
        return {"temperature": 0.0, **fixed}
    sampling = dict(settings.SAMPLING, **fixed)
    if args.unseeded:
        del sampling["seed"]
    return sampling


def _mode(args: argparse.Namespace) -> str:
    mode = "greedy" if not args.sampled else "sampled, unseeded" if args.unseeded else "sampled"
    mode = f"{mode}, every text its full length" if args.fixed_length else mode
    return f"{mode}, each document alone on a fresh system" if args.each_alone else mode


# ---------------------------------------------------------------- the engine


def run_engine(mode: str, in_flight: int, args: argparse.Namespace) -> Run:
    from genstruct_service.engine import GenerationRequest, Sampling, speculation
    from genstruct_service.engine.llama import LlamaEngine
    from genstruct_service.prompt import GENSTRUCT_FORMAT

    by_match: dict[int, list[int]] = {}
    record = speculation.Acceptance.record

    def counted(
        self: Any, match: int, drafted: int, accepted: int, *, borrowed: bool = False
    ) -> None:
        counts = by_match.setdefault(-match if borrowed else match, [0, 0, 0, 0])
        counts[0] += 1
        counts[1] += drafted
        counts[2] += speculation.compared(drafted, accepted)
        counts[3] += accepted
        record(self, match, drafted, accepted, borrowed=borrowed)

    speculation.Acceptance.record = counted  # type: ignore[method-assign]
    docs = documents(args.docs, args.documents, args.only)
    kwargs = settings.engine_kwargs(args)
    kwargs["speculation"] = SpeculationSettings(
        mode=mode, draft_max=args.spec_draft_max, ngram_min=args.spec_ngram_min,
        ngram_max=args.spec_ngram_max,
    )
    engine = LlamaEngine(
        args.model, prompt_format=GENSTRUCT_FORMAT, n_parallel=in_flight,
        max_queue=len(docs), **kwargs,
    )
    sampling = Sampling(max_tokens=args.max_tokens, **_sampling(args))
    requests = [GenerationRequest(d.title, d.content, sampling, stream=False) for d in docs]
    done, seconds = asyncio.run(drive(engine, requests, in_flight))
    return Run(
        f"engine:{mode}", in_flight, len(docs), sum(d.completion_tokens for d in done), seconds,
        sum(d.draft_tokens for d in done), sum(d.accepted_draft_tokens for d in done),
        sorted(d.generations[0].text for d in done),  # as a set: drive() ends out of order
        engine.step_costs(), by_match,
        sum(d.timings.total_seconds - d.timings.first_token_seconds for d in done),
    )


def _engine_in_subprocess(mode: str, in_flight: int, args: argparse.Namespace) -> Run:
    command = [
        sys.executable, "-m", "bench.speculation", "--worker", mode, "--in-flight",
        str(in_flight), "--max-tokens", str(args.max_tokens), "--docs", str(args.docs),
        *(["--documents", str(args.documents)] if args.documents else []),
        *(["--only", str(args.only)] if args.only is not None else []),
        *(["--sampled"] if args.sampled else []),
        *(["--unseeded"] if args.unseeded else []),
        *(["--fixed-length"] if args.fixed_length else []),
        "--spec-draft-max", str(args.spec_draft_max), "--spec-ngram-min",
        str(args.spec_ngram_min), "--spec-ngram-max", str(args.spec_ngram_max),
        *settings.worker_flags(args),
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    record = json.loads(done.stdout.strip().splitlines()[-1])
    # JSON keys are strings
    record["step_costs"] = {int(k): v for k, v in record["step_costs"].items()}
    record["by_match"] = {int(k): v for k, v in record["by_match"].items()}
    return Run(**record)


def summed(runs: Sequence[Run]) -> Run:
    """The runs of one system that each ran one document (`--each-alone`), as one run of
    them all; the step costs are those timed for the first."""
    first = runs[0]
    return Run(
        first.system, first.in_flight, sum(r.documents for r in runs),
        sum(r.generated_tokens for r in runs), sum(r.seconds for r in runs),
        sum(r.drafted for r in runs), sum(r.accepted for r in runs),
        sorted(text for r in runs for text in r.texts), first.step_costs,
        merged_by_match(r.by_match for r in runs), sum(r.decode_seconds for r in runs),
    )


def merged_by_match(tables: Iterable[dict[int, list[int]]]) -> dict[int, list[int]]:
    """Drafts by match (`Run.by_match`) of several runs, added up."""
    merged: dict[int, list[int]] = {}
    for table in tables:
        for match, counts in table.items():
            total = merged.setdefault(match, [0] * len(counts))
            for i, n in enumerate(counts):
                total[i] += n
    return merged


# ---------------------------------------------------------------- llama-server


def run_server(binary: Path, spec: str, in_flight: int, args: argparse.Namespace) -> Run:
    from genstruct_service.prompt import render_prompt

    from bench import llama_server

    prompts = [
        render_prompt(d.title, d.content)
        for d in documents(args.docs, args.documents, args.only)
    ]
    body = {"n_predict": args.max_tokens, "stop": [] if args.fixed_length else [STOP],
            "cache_prompt": False, "repeat_penalty": 1.0, "stream": False, **_sampling(args)}
    if args.sampled:
        body["samplers"] = ["top_k", "top_p", "min_p", "temperature"]
    with llama_server.serve(
        binary, args.model, n_parallel=in_flight, settings=settings.server_flags(args),
        extra=["--cache-ram", "0", *SERVER_SPECS[spec]],
    ) as server:
        server.post("/completion", {**body, "prompt": prompts[0], "n_predict": 2})  # warm

        def call(prompt: str) -> dict[str, Any]:
            return server.post("/completion", {**body, "prompt": prompt})

        start = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            results = list(pool.map(call, prompts))
        seconds = time.perf_counter() - start
    timings = [r.get("timings", {}) for r in results]
    return Run(
        f"server:{spec}", in_flight, len(prompts),
        sum(int(r.get("tokens_predicted", 0)) for r in results), seconds,
        sum(int(t.get("draft_n", 0)) for t in timings),
        sum(int(t.get("draft_n_accepted", 0)) for t in timings),
        sorted(str(r.get("content", "")) for r in results),
        decode_seconds=sum(float(t.get("predicted_ms", 0.0)) for t in timings) / 1e3,
    )


# ---------------------------------------------------------------- the host and the tables

# the CPU features that decide which kernels llama.cpp runs, and so the shape of the cost curve
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
          "amx_bf16", "fma", "f16c")  # fmt: skip


def host() -> dict[str, Any]:
    """The CPU this ran on: its model name and the flags among _FLAGS it has."""
    model, flags = "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {"cpu": model, "flags": [f for f in _FLAGS if f in flags], "cpus": os.cpu_count()}


def cost_table(runs: list[Run]) -> str:
    """The step time by rows each level's engine timed before serving (the first such run),
    in ms and as multiples of one row."""
    lines = []
    for level in sorted({r.in_flight for r in runs}):
        costs = next((r.step_costs for r in runs if r.in_flight == level and r.step_costs), {})
        if costs:
            one = costs[min(costs)]
            lines.append(f"{level} in flight, step ms by rows: " + ", ".join(
                f"{rows}: {seconds * 1e3:.1f} ({seconds / one:.2f}x)"
                for rows, seconds in sorted(costs.items())))
    return "\n".join(lines)


def acceptance_table(runs: list[Run]) -> str:
    """Drafts by the length of their match, summed over every run of each engine mode: the
    chance a drafted token is accepted after the one before it was (accepted / compared)."""
    lines = [f"{'system':<16}{'match':>12}{'drafts':>8}{'drafted':>9}{'compared':>10}"
             f"{'accepted':>10}{'rate':>7}{'whole':>7}"]
    for system in sorted({r.system for r in runs if r.by_match}):
        total = merged_by_match(r.by_match for r in runs if r.system == system)
        for match, (drafts, drafted, compared, accepted) in sorted(
            total.items(), key=lambda item: (item[0] < 0, abs(item[0]))
        ):
            rate = accepted / compared if compared else 0.0
            # the share of drafted tokens accepted: 1.0 when every draft is taken whole
            whole = accepted / drafted if drafted else 0.0
            label = f"{-match} borrowed" if match < 0 else str(match)
            lines.append(f"{system:<16}{label:>12}{drafts:>8}{drafted:>9}{compared:>10}"
                         f"{accepted:>10}{rate:>7.2f}{whole:>7.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the table


def _wall(run: Run) -> float:
    return run.tokens_per_second


def _decoding(run: Run) -> float:
    return run.decode_tokens_per_second


def median_run(
    runs: list[Run], system: str, in_flight: int, speed: Callable[[Run], float] = _wall
) -> Run | None:
    mine = sorted((r for r in runs if r.system == system and r.in_flight == in_flight),
                  key=speed)
    return mine[(len(mine) - 1) // 2] if mine else None


def table(
    runs: list[Run], systems: list[str], levels: list[int], speed: Callable[[Run], float] = _wall
) -> str:
    """Each system's median round by `speed`, against engine:off, server:none and the best
    server:ngram-* setting."""
    lines = [f"{'system':<26}{'in flight':>10}{'tok/s':>9}{'runs':>18}{'vs engine:off':>15}"
             f"{'vs server:none':>16}{'vs best ngram':>15}{'drafted':>9}{'accepted':>10}"]
    for level in levels:
        off = median_run(runs, "engine:off", level, speed)
        none = median_run(runs, "server:none", level, speed)
        ngram = [median_run(runs, s, level, speed) for s in systems if s.startswith("server:ngram")]
        best = max((r for r in ngram if r is not None), key=speed, default=None)
        for system in systems:
            run = median_run(runs, system, level, speed)
            if run is None:
                continue
            every = sorted(speed(r) for r in runs if r.system == system and r.in_flight == level)
            spread = "/".join(f"{x:.1f}" for x in every)

            def ratio(base: Run | None, run: Run = run) -> str:
                return f"{speed(run) / speed(base):.2f}x" if base and speed(base) else "-"

            lines.append(
                f"{system:<26}{level:>10}{speed(run):>9.1f}{spread:>18}{ratio(off):>15}"
                f"{ratio(none):>16}{ratio(best):>15}{run.drafted:>9}{run.accepted:>10}"
            )
    return "\n".join(lines)


def paired_table(rounds: list[dict[tuple[str, int], Run]], systems: list[str],
                 levels: list[int]) -> str:
    """Each round's ratio of every system to engine:off and to the best server:ngram-*
    setting (by median) of that same round, and their median.

    Runs minutes apart on a shared machine differ by more than many effects that are
    measured (on 2 cores of an AMD EPYC, the same 8-row decode step took 47 to 63 ms from
    one run to the next): a ratio of two medians mixes rounds, while a ratio within each
    round compares runs next to each other, and the rounds' spread shows what one is worth.
    """
    runs = [run for by_system in rounds for run in by_system.values()]
    lines = [f"{'system':<26}{'in flight':>10}{'against':>20}  median  rounds"]
    for level in levels:
        ngram = [s for s in systems if s.startswith("server:ngram")]
        medians = [(_wall(run), s) for s in ngram
                   if (run := median_run(runs, s, level)) is not None]
        best = max(medians)[1] if medians else None
        for system in systems:
            for base in ("engine:off", best):
                if base is None or base == system:
                    continue
                ratios = [by[(system, level)].tokens_per_second
                          / by[(base, level)].tokens_per_second
                          for by in rounds if (system, level) in by and (base, level) in by]
                if not ratios:
                    continue
                middle = sorted(ratios)[(len(ratios) - 1) // 2]
                each = " ".join(f"{r:.2f}" for r in ratios)
                lines.append(f"{system:<26}{level:>10}{base:>20}  {middle:5.2f}x  {each}")
    return "\n".join(lines)


def round_order(systems: list[T], round_: int) -> list[T]:
    """The systems in the order round `round_` (from 0) runs them: as given, then reversed,
    and so on, so that no system always runs first or last of its round. Where a run sits in
    its round may move its speed: at 8 in flight on 2 cores of an AMD EPYC, an engine:auto
    that drafted at most 36 of its 1536 tokens a run came to 0.93x engine:off (paired
    median) over 5 rounds run after it, and 1.00x over 5 rounds run before it."""
    return list(reversed(systems)) if round_ % 2 else list(systems)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    settings.add_arguments(parser, n_ctx=None)
    parser.add_argument("--levels", default="1,8", help="documents in flight, comma-separated")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--documents", type=Path,
                        help="a JSONL file of {title, content} to run instead of the corpus and "
                        "the examples (documents the planner was not tuned on)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engine-modes", default="off,auto")
    defaults = SpeculationSettings()
    parser.add_argument("--spec-draft-max", type=int, default=defaults.draft_max)
    parser.add_argument("--spec-ngram-min", type=int, default=defaults.ngram_min)
    parser.add_argument("--spec-ngram-max", type=int, default=defaults.ngram_max)
    parser.add_argument("--server-specs", default="none,ngram-mod",
                        help="comma-separated subset of " + ",".join(SERVER_SPECS))
    parser.add_argument("--sampled", action="store_true",
                        help="sample as Genstruct is usually run (temperature 0.7, top_k 40, "
                        "top_p 0.95, min_p 0.05, one seed) instead of greedy decoding")
    parser.add_argument("--unseeded", action="store_true",
                        help="with --sampled: no seed, so that a request is planned live, "
                        "from what the engine measured and learned, not from itself alone")
    parser.add_argument("--fixed-length", action="store_true",
                        help="every system writes --max-tokens tokens (end of sequence and the "
                        "stop ignored), so that wall speeds compare the same amount of text; "
                        "greedy texts at 8 and 16 in flight differ in length from run to run")
    parser.add_argument("--check-text", action="store_true",
                        help="count documents whose text engine:auto and engine:off share")
    parser.add_argument("--each-alone", action="store_true",
                        help="with --levels 1: start every system afresh for each document, so "
                        "that none drafts from an earlier request's text (llama-server's "
                        "ngram-mod pool is shared by all its requests)")
    parser.add_argument("--out", type=Path, help="write every run as JSON here")
    parser.add_argument("--only", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--in-flight", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    if args.each_alone and levels != [1]:
        parser.error("--each-alone runs one document at a time: give --levels 1")
    requested_ctx = args.n_ctx
    settings.resolve(args)

    def sized(level: int) -> argparse.Namespace:
        # a corpus prompt and its answer fit in 1,024 tokens per slot
        return argparse.Namespace(**{**vars(args), "n_ctx": requested_ctx or 1024 * level})

    if args.worker:
        run = run_engine(args.worker, args.in_flight, args)
        print(json.dumps(asdict(run)))
        return 0

    modes = [m for m in args.engine_modes.split(",") if m]
    specs = [s for s in args.server_specs.split(",") if s]
    machine = host()
    print(f"host {machine['cpu']} ({machine['cpus']} CPUs; {' '.join(machine['flags'])})")
    print(f"model {args.model}\nthreads {args.threads}, n_batch {args.n_batch}, n_ubatch "
          f"{args.n_ubatch}, n_gpu_layers {args.n_gpu_layers}, flash attention "
          f"{args.flash_attn}, {_mode(args)}, up to "
          f"{args.max_tokens} tokens, {args.docs} documents, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    binary = None
    if specs:
        from bench import llama_server

        binary = llama_server.ensure_built()

    def one(kind: str, name: str, level: int, run_args: argparse.Namespace) -> Run:
        if kind == "engine":
            return _engine_in_subprocess(name, level, run_args)
        assert binary is not None
        return run_server(binary, name, level, run_args)

    n_docs = len(documents(args.docs, args.documents))
    runs: list[Run] = []
    rounds: list[dict[tuple[str, int], Run]] = []
    for round_ in range(args.repeat):
        rounds.append({})
        for level in levels:
            level_args = sized(level)
            todo = [("engine", m) for m in modes]
            if binary is not None:
                todo += [("server", s) for s in specs]
            for kind, name in round_order(todo, round_):
                if args.each_alone:
                    alone = (argparse.Namespace(**{**vars(level_args), "only": i})
                             for i in range(n_docs))  # fmt: skip
                    run = summed([one(kind, name, level, doc_args) for doc_args in alone])
                else:
                    run = one(kind, name, level, level_args)
                runs.append(run)
                rounds[-1][(run.system, level)] = run
                print(f"round {round_ + 1} {run.system:<26} {level} in flight: "
                      f"{run.tokens_per_second:6.1f} tok/s ({run.generated_tokens} tokens in "
                      f"{run.seconds:.1f} s, drafted {run.drafted}, accepted {run.accepted})",
                      flush=True)
                if args.out:
                    args.out.write_text(json.dumps(
                        {"host": machine, "runs": [asdict(r) for r in runs]}, indent=1))
    systems = [f"engine:{m}" for m in modes] + [f"server:{s}" for s in specs]
    print("\nwall: generated tokens per second of the whole run")
    print(table(runs, systems, levels))
    print("\ndecode: generated tokens per second of a request while it decodes (no prompts)")
    print(table(runs, systems, levels, _decoding))
    if args.repeat > 1:
        print("\nwall, paired: each round's ratio to the runs of the same round")
        print(paired_table(rounds, systems, levels))
    if any(r.step_costs for r in runs):
        print()
        print(cost_table(runs))
    if any(r.by_match for r in runs):
        print()
        print(acceptance_table(runs))
    if args.check_text and {"off", "auto"} <= set(modes):
        for level in levels:
            off = median_run(runs, "engine:off", level)
            auto = median_run(runs, "engine:auto", level)
            if off and auto:
                same = len(set(off.texts) & set(auto.texts))
                print(f"{level} in flight: {same} of {off.documents} texts alike with and "
                      "without speculation")
    print(f"median of {args.repeat} interleaved rounds; load average at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
