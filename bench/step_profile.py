"""Where one decode step of the engine goes: llama_decode (until the device is done), sampling,
the rest of Python, and how often the asyncio side is woken per request.

    python -m bench.step_profile [--model synthetic:4] [--in-flight 1] [--stream]

Runs LlamaEngine in this process on the corpus documents (end of sequence suppressed, so
every step generates), timing the engine thread's calls by wrapping them: `llama_decode`,
the samplers, the whole step, and each delivery of a step's events to the asyncio side. The
wrapping costs a few microseconds per call, the same with and without any change measured.
A profile, not a benchmark: compare tokens/s with bench.throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import time
from collections.abc import Callable
from typing import Any

from bench import settings
from bench.corpus import DOCUMENTS
from bench.throughput import drive


class Timer:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed


def profile(args: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp
    from genstruct_service.engine import GenerationRequest, Sampling
    from genstruct_service.engine import llama as engine_module
    from genstruct_service.engine import loop as loop_module
    from genstruct_service.engine import request as request_module
    from genstruct_service.engine.backend import sampling as sampling_module

    decode, sample, step, sends = Timer(), Timer(), Timer(), Timer()
    queue_decode = llama_cpp.llama_decode

    def decode_and_wait(ctx: Any, batch: Any) -> Any:
        # On a GPU llama_decode only queues the work, and the first sampler to read the
        # logits waits for it: waiting here puts the GPU's time in decode, not in sampling.
        rc = queue_decode(ctx, batch)
        llama_cpp.llama_synchronize(ctx)
        return rc

    llama_cpp.llama_decode = decode.wrap(decode_and_wait)
    llama_cpp.llama_sampler_sample = sample.wrap(llama_cpp.llama_sampler_sample)
    constrained = sampling_module.ConstrainedSampler
    constrained.sample = sample.wrap(constrained.sample)  # type: ignore[method-assign]
    engine_cls = engine_module.LlamaEngine
    # a step is schedule, execute and update (the old engine's _step: the same less admission)
    loop_cls = loop_module.EngineLoop
    loop_cls._step = step.wrap(loop_cls._step)  # type: ignore[method-assign]
    # one delivery per event loop per step: each is one wake-up of the asyncio side
    request_module.deliver = sends.wrap(request_module.deliver)

    kwargs = settings.engine_kwargs(args)
    accepted = inspect.signature(engine_cls.__init__).parameters
    if "prompt_format" in accepted:
        from genstruct_service.prompt import GENSTRUCT_FORMAT

        kwargs["prompt_format"] = GENSTRUCT_FORMAT
    if "n_ubatch" not in accepted:  # an engine from before the settings of llama-server
        kwargs["flash_attn"] = {"auto": None, "on": True, "off": False}[args.flash_attn]
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    engine = engine_cls(args.model, n_parallel=args.in_flight, max_queue=max(args.docs, 1),
                        **kwargs)
    sampling = Sampling(**settings.SAMPLING, max_tokens=args.max_tokens, ignore_eos=True)
    extra = {"stream": args.stream} if "stream" in GenerationRequest.__dataclass_fields__ else {}
    # the corpus repeated to --docs documents, so that many can be in flight
    requests = [GenerationRequest(d.title, d.content, sampling, **extra)
                for d in (DOCUMENTS[i % len(DOCUMENTS)] for i in range(args.docs))]
    decode.seconds = sample.seconds = step.seconds = sends.seconds = 0.0
    decode.calls = sample.calls = step.calls = sends.calls = 0

    done, seconds = asyncio.run(drive(engine, requests, args.in_flight))
    generated = sum(d.completion_tokens for d in done)
    # submission to first token, and admission to the end, each less the queue
    prefill = [d.timings.first_token_seconds - d.timings.queue_seconds for d in done]
    busy = [d.timings.total_seconds - d.timings.queue_seconds for d in done]
    steps = max(step.calls, 1)
    return {
        "model": args.model, "in_flight": args.in_flight, "stream": args.stream,
        "documents": len(requests), "generated_tokens": generated,
        "tokens_per_second": generated / seconds, "steps": step.calls,
        "step_ms": step.seconds / steps * 1e3,
        "decode_ms_per_step": decode.seconds / steps * 1e3,
        "sampling_ms_per_step": sample.seconds / steps * 1e3,
        "python_ms_per_step": (step.seconds - decode.seconds - sample.seconds) / steps * 1e3,
        "idle_ms_between_steps": (seconds - step.seconds) / steps * 1e3,
        "wakeups_per_request": sends.calls / len(requests),
        "prefill_share_of_request_time": sum(prefill) / max(sum(busy), 1e-9),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    settings.add_arguments(parser, n_ctx=None)  # default: 1024 per slot, as bench.throughput
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--stream", action="store_true",
                        help="read text as it comes, as GenerateStream does")
    args = parser.parse_args(argv)
    args.n_ctx = args.n_ctx or 1024 * args.in_flight
    settings.resolve(args)
    print(json.dumps(profile(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
