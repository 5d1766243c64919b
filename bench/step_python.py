"""The Python of one engine decode step without a model: the scheduler's `schedule`, the
runner's `execute` (its real row writer and llama_batch, with `llama_decode` a no-op) and
the update, at N sequences in flight, each feeding one row per step.

    python -m bench.step_python [--in-flight 1,8,16] [--steps 3000]

Each level is timed twice:
- hot: steps back to back, so code and objects stay in the CPU's caches;
- cold: the caches are evicted before each step (a copy of 48 MiB), as a real decode on the
  same cores evicts them.

`bench.step_profile` measures the Python of a step in the running engine. This benchmark
tells how much of that Python is the step's own work (hot) and how much is reading code
and objects back into the caches after each decode (cold less hot). On the AMD EPYC host of
the engine issue, the two were about 8 and 60 microseconds at 1 in flight, so the cache
misses were most of it. A profile, not a benchmark against a peer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from types import SimpleNamespace
from typing import Any

_EVICT = 48 << 20  # bytes copied before a cold step: more than the caches of the hosts used
_REPEATS = 5


class _Vocab:
    eog = frozenset({0})

    def piece(self, token: int) -> bytes:
        return b"ab"

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return [1] * len(text)


class _Sampler:
    """Always the same token, never the end: every step decodes every sequence."""

    def sample(self, row: int) -> int:
        return 5

    def take_forced(self, token: int) -> None:
        pass

    def close(self) -> None:
        pass


def _engine(in_flight: int, loop: asyncio.AbstractEventLoop) -> Any:
    from genstruct_service.engine.backend.runner import Runner
    from genstruct_service.engine.fitting import FittedPrompt
    from genstruct_service.engine.inbox import Inbox
    from genstruct_service.engine.request import Job, Request
    from genstruct_service.engine.scheduler import StepScheduler
    from genstruct_service.engine.sequence import Sequence
    from genstruct_service.engine.types import GenerationRequest, Sampling
    from genstruct_service.engine.update import Updater

    max_tokens = 10**6
    scheduler = StepScheduler(in_flight, in_flight * 2 * max_tokens, n_batch=512,
                              split_kv=True, drafts=None)  # fmt: skip
    updater = Updater(scheduler, Inbox(max_queue=in_flight, n_parallel=in_flight), None)
    loaded = SimpleNamespace(ctx=None, mem=None, vocab=None, pools=None, free=lambda: None,
                             tokenizer=SimpleNamespace(n_vocab=16))  # fmt: skip
    runner = Runner(loaded, 512)  # type: ignore[arg-type]  # a stand-in for LoadedModel
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0)
    for _ in range(in_flight):
        job = Job(GenerationRequest("title", "content", sampling),
                  FittedPrompt([1] * 64, truncated=False), None, loop)  # fmt: skip
        seqs = [Sequence(0, _Sampler(), _Vocab(), stops=("\n\n\n",), max_tokens=max_tokens,
                         stream=False)]  # fmt: skip
        scheduler.enqueue(Request(job, seqs))
    return scheduler, runner, updater


def _step(scheduler: Any, runner: Any, updater: Any) -> None:
    plan = scheduler.schedule(cancelled=False)
    updater.update(plan, runner.execute(plan))


def _time(in_flight: int, steps: int, *, cold: bool) -> float:
    """Microseconds per step, the median of `_REPEATS` fresh engines."""
    loop = asyncio.new_event_loop()  # never run: the engine queues its events on it
    source, target = (bytearray(_EVICT), bytearray(_EVICT)) if cold else (b"", bytearray())
    results = []
    try:
        for _ in range(_REPEATS):
            scheduler, runner, updater = _engine(in_flight, loop)
            for _ in range(3):  # admission and the prompts
                _step(scheduler, runner, updater)
            seconds = 0.0
            for _ in range(steps):
                if cold:
                    target[:] = source
                started = time.perf_counter()
                _step(scheduler, runner, updater)
                seconds += time.perf_counter() - started
            generated = sum(s.n_generated for r in scheduler.running for s in r.seqs)
            if generated < steps * in_flight:
                raise RuntimeError("a sequence stopped decoding: the timing would be short")
            results.append(seconds / steps * 1e6)
            runner.close()
    finally:
        loop.close()
    return statistics.median(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", default="1,8,16")
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args(argv)

    import llama_cpp

    # no model: the decode and the KV edits do nothing (the batch itself is llama.cpp's)
    stubs = {"llama_decode": lambda ctx, batch: 0, "llama_memory_seq_rm": lambda *a: True,
             "llama_memory_seq_cp": lambda *a: None}  # fmt: skip
    real = {name: getattr(llama_cpp, name) for name in stubs}
    for name, stub in stubs.items():
        setattr(llama_cpp, name, stub)
    try:
        for level in (int(n) for n in args.in_flight.split(",")):
            hot = _time(level, args.steps, cold=False)
            cold = _time(level, max(args.steps // 10, 20), cold=True)
            print(json.dumps({"in_flight": level, "hot_us_per_step": round(hot, 1),
                              "cold_us_per_step": round(cold, 1)}))  # fmt: skip
    finally:
        for name, function in real.items():
            setattr(llama_cpp, name, function)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
