"""What the KV layout costs a step: one unified pool against a stream per slot.

    python -m bench.kv_layout [--model synthetic:4] [--slots 16] [--cells 480] [--repeat 5]

`--slots - 1` sequences of `--cells` tokens each are prefilled, then three kinds of step are
timed with the same random tokens in both layouts, each the median of `--repeat`:
one decoding row per sequence; a `--chunk`-token prompt chunk for the last slot alone; and
both in one batch, as a step where a document joins others that are generating. Every row
the step adds is removed again before the next. CPU flash attention works on tiles of 64
query rows and skips a block of KV cells only when it is masked for every row of the tile,
so in a unified cache the third kind reads the cells of every sequence. The last two kinds
decode half the sequences, from slots in a run and from every other slot: with a stream per
slot, llama.cpp puts only consecutive slots into one ubatch, so a gap between busy slots
costs another pass over the weights. Both layouts are
timed in turn, so a slow moment of the machine spreads over both.
This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench import settings

STEPS = ("decode rows", "prompt chunk", "decode rows + prompt chunk",
         "half the rows, slots in a run", "half the rows, every other slot")


class _Context:
    """One llama.cpp context of the benchmark's settings in one layout, its slots filled."""

    def __init__(self, ll: Any, model: Any, args: argparse.Namespace, *, unified: bool) -> None:
        from genstruct_service.engine.backend.model import FLASH_ATTN

        self._ll = ll
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = args.slots * (args.cells + args.chunk + args.repeat + 8)
        cparams.n_batch = max(args.n_batch, args.slots + args.chunk)
        cparams.n_ubatch = min(args.n_ubatch, cparams.n_batch)
        cparams.n_seq_max = args.slots
        cparams.kv_unified = unified
        cparams.n_threads = cparams.n_threads_batch = args.threads
        cparams.flash_attn_type = FLASH_ATTN[args.flash_attn]
        cparams.no_perf = True
        self.ctx = ll.llama_init_from_model(model, cparams)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create a context")
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(cparams.n_batch, 0, 1)
        self.n_batch = cparams.n_batch

    def decode(self, rows: Sequence[tuple[int, int, int, bool]]) -> float:
        """Rows of (token, position, slot, logits); the seconds llama.cpp took."""
        ll, batch = self._ll, self.batch
        for i, (token, pos, slot, logits) in enumerate(rows):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = logits
        batch.n_tokens = len(rows)
        began = time.perf_counter()
        if ll.llama_decode(self.ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        ll.llama_synchronize(self.ctx)
        return time.perf_counter() - began

    def free(self) -> None:
        self._ll.llama_batch_free(self.batch)
        self._ll.llama_free(self.ctx)


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import llama_cpp as ll

    model = settings.load_model(args)
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    rng = random.Random(1)
    filled = args.slots - 1  # the last slot takes the prompt chunk
    history = [[rng.randrange(n_vocab) for _ in range(args.cells)] for _ in range(filled)]
    chunk = [rng.randrange(n_vocab) for _ in range(args.chunk)]
    layouts = {"unified": True, "split": False}
    contexts = {name: _Context(ll, model, args, unified=u) for name, u in layouts.items()}
    for c in contexts.values():
        for slot, tokens in enumerate(history):
            for start in range(0, len(tokens), c.n_batch):
                part = tokens[start : start + c.n_batch]
                c.decode([(t, start + j, slot, False) for j, t in enumerate(part)])

    def decoding(slots: Sequence[int]) -> list[tuple[int, int, int, bool]]:  # new tokens
        return [(rng.randrange(n_vocab), args.cells, s, True) for s in slots]

    every = range(filled)
    half = len(every[::2])

    prompt = [(t, j, filled, j == len(chunk) - 1) for j, t in enumerate(chunk)]
    kinds: dict[str, Callable[[], list[tuple[int, int, int, bool]]]] = {
        STEPS[0]: lambda: decoding(every),
        STEPS[1]: lambda: prompt,
        STEPS[2]: lambda: decoding(every) + prompt,
        STEPS[3]: lambda: decoding(every[:half]),
        STEPS[4]: lambda: decoding(every[::2]),
    }
    times = {name: {kind: [] for kind in STEPS} for name in contexts}
    for _ in range(args.repeat):
        for kind, rows in kinds.items():
            batch = rows()
            for name, c in contexts.items():
                times[name][kind].append(c.decode(batch))
                for slot in range(args.slots):  # back to the filled slots alone
                    ll.llama_memory_seq_rm(c.mem, slot, args.cells if slot < filled else 0, -1)
    for c in contexts.values():
        c.free()
    ll.llama_model_free(model)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    settings.add_arguments(parser, n_ctx=None)
    parser.add_argument("--slots", type=int, default=16, help="sequences, the last one prefilling")
    parser.add_argument("--cells", type=int, default=480, help="tokens in each other sequence")
    parser.add_argument("--chunk", type=int, default=200, help="tokens of the prompt chunk")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    settings.resolve(args)
    print(f"model {args.model}\nthreads {args.threads}, n_gpu_layers {args.n_gpu_layers}, "
          f"flash attention {args.flash_attn}, {args.slots - 1} sequences of {args.cells} "
          f"tokens, a {args.chunk}-token prompt chunk, median of {args.repeat}; load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    seconds = measure(args)
    print(f"{'step':<34}{'unified ms':>12}{'split ms':>10}{'unified/split':>15}")
    for kind in STEPS:
        u, s = seconds["unified"][kind], seconds["split"][kind]
        print(f"{kind:<34}{u * 1000:>12.1f}{s * 1000:>10.1f}{u / s:>14.2f}x")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
