"""What verifying a draft costs: one decode step of 1 + k rows against one of a single row.

    python -m bench.verify_cost [--model synthetic] [--drafts 0,1,2,4,8,16] [--repeat 5]
                                [--logits all|last] [--out STEP_COSTS.json]

Speculation pays when the tokens a draft saves outweigh the extra rows of its step. With
random weights nothing is ever accepted, so on the Genstruct-7B-shaped model
(bench/synthetic_model.py) only this cost side can be measured; its acceptance is
measured on a real model by bench.speculation. After a prompt of `--prompt` tokens, each
step decodes the last token plus k drafted ones, with logits at every row as the engine's
verification asks, and removes them again; the median of `--repeat` steps is reported,
and every row count is timed in turn so a slow moment of the machine spreads over all.
`--logits last` asks for logits at the last row only, as a prompt chunk does: the
difference is what the output layer costs per verified row (on Gemma 3 270M, whose 262k
tokens make it the largest matrix of the model, most of a step). This is a benchmark, not a
test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from bench import settings


def measure(args: argparse.Namespace, drafts: list[int]) -> dict[int, float]:
    import llama_cpp as ll
    from genstruct_service.engine.backend.model import CACHE_TYPES, FLASH_ATTN

    model = settings.load_model(args)
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = args.prompt + max(drafts) + 8
    cparams.n_batch = max(args.n_batch, max(drafts) + 1)
    cparams.n_ubatch = min(args.n_ubatch, cparams.n_batch)
    cparams.n_threads = cparams.n_threads_batch = args.threads
    cparams.flash_attn_type = FLASH_ATTN[args.flash_attn]
    cparams.type_k = cparams.type_v = CACHE_TYPES["f16"]
    cparams.no_perf = True
    ctx = ll.llama_init_from_model(model, cparams)
    mem = ll.llama_get_memory(ctx)
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    batch = ll.llama_batch_init(cparams.n_batch, 0, 1)

    def decode(start: int, tokens: list[int], logits_all: bool) -> float:
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if logits_all or i == len(tokens) - 1 else 0
        batch.n_tokens = len(tokens)
        began = time.perf_counter()
        if ll.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        ll.llama_synchronize(ctx)
        ll.llama_get_logits_ith(ctx, len(tokens) - 1)
        return time.perf_counter() - began

    tokens = [(i * 7919) % n_vocab for i in range(args.prompt + max(drafts) + 1)]
    for start in range(0, args.prompt, cparams.n_batch):  # the prompt, in n_batch chunks
        decode(start, tokens[start : min(start + cparams.n_batch, args.prompt)], False)
    times: dict[int, list[float]] = {k: [] for k in drafts}
    decode(args.prompt, tokens[args.prompt : args.prompt + 1], True)  # a first warm step
    ll.llama_memory_seq_rm(mem, 0, args.prompt, -1)
    for _ in range(args.repeat):
        for k in drafts:
            rows = tokens[args.prompt : args.prompt + 1 + k]
            times[k].append(decode(args.prompt, rows, args.logits == "all"))
            ll.llama_memory_seq_rm(mem, 0, args.prompt, -1)
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    settings.add_arguments(parser, n_ctx=None)
    parser.add_argument("--drafts", default="0,1,2,4,8,16", help="draft lengths k to time")
    parser.add_argument("--prompt", type=int, default=384, help="tokens decoded before")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--logits", choices=("all", "last"), default="all",
                        help="rows with logits: every one (verification) or the last")
    parser.add_argument("--out", type=Path,
                        help="write the step seconds by batch rows as JSON (for "
                        "bench.draft_replay --price-with)")
    args = parser.parse_args(argv)
    settings.resolve(args)
    drafts = sorted({0, *(int(x) for x in args.drafts.split(","))})
    print(f"model {args.model}\nthreads {args.threads}, n_gpu_layers {args.n_gpu_layers}, "
          f"flash attention {args.flash_attn}, logits at "
          f"{'every row' if args.logits == 'all' else 'the last row only'}, after "
          f"{args.prompt} prompt tokens, median of "
          f"{args.repeat}; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    seconds = measure(args, drafts)
    one = seconds[0]
    print(f"{'draft k':>8}{'rows':>6}{'ms/step':>10}{'vs 1 row':>10}{'break-even tokens':>19}")
    for k in drafts:
        ratio = seconds[k] / one
        # the step must yield `ratio` tokens to match one-row decoding: 1 + accepted
        print(f"{k:>8}{k + 1:>6}{seconds[k] * 1000:>10.1f}{ratio:>9.2f}x{ratio - 1:>19.2f}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out:
        args.out.write_text(json.dumps({k + 1: seconds[k] for k in drafts}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
