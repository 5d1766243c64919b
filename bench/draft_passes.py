"""What a draft costs beside other sequences: one decode step of several sequences, with and
without drafted rows on some of them, with a KV stream per slot and with one unified stream.

    python -m bench.draft_passes [--in-flight 8] [--draft 4] [--repeat 7]

With a stream per slot llama.cpp cuts a batch into passes that take the same number of rows
from each of a run of consecutive slots (`split_equal`), so a sequence that feeds a draft
beside others that feed one row finishes its draft in a pass of its own. The planner's
`BatchShape` (engine/step_cost.py) models this; this benchmark measures it. After a
`--prompt`-token prompt on every slot, each shape is timed in turn, `--repeat` rounds, and
the median is reported. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence

from bench import settings


def shapes(in_flight: int, draft: int) -> dict[str, dict[int, int]]:
    """Rows by slot of each step timed."""
    every = dict.fromkeys(range(in_flight), 1)
    mid, other = in_flight // 2, in_flight // 4
    return {
        f"{in_flight} x 1 row": every,
        f"+ {draft} drafted on one": every | {mid: 1 + draft},
        f"+ {draft} drafted on two apart": every | {other: 1 + draft, mid + 1: 1 + draft},
        "+ 1 drafted on each": dict.fromkeys(range(in_flight), 2),
        f"1 x {1 + draft} rows alone": {0: 1 + draft},
    }


def measure(args: argparse.Namespace, *, unified: bool) -> dict[str, float]:
    import llama_cpp as ll
    from genstruct_service.engine.backend.model import CACHE_TYPES, FLASH_ATTN

    model = settings.load_model(args)
    cparams = ll.llama_context_default_params()
    cparams.n_seq_max = args.in_flight
    cparams.n_ctx = args.in_flight * (args.prompt + args.draft + 64)
    cparams.n_batch = cparams.n_ubatch = max(args.n_batch, args.prompt)
    cparams.n_threads = cparams.n_threads_batch = args.threads
    cparams.flash_attn_type = FLASH_ATTN[args.flash_attn]
    cparams.type_k = cparams.type_v = CACHE_TYPES["f16"]
    cparams.kv_unified = unified
    cparams.no_perf = True
    ctx = ll.llama_init_from_model(model, cparams)
    mem = ll.llama_get_memory(ctx)
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    batch = ll.llama_batch_init(cparams.n_batch, 0, 1)

    def decode(rows: list[tuple[int, int]]) -> float:
        """(slot, position) rows, logits at every row as verification has them."""
        for i, (slot, pos) in enumerate(rows):
            batch.token[i] = (pos * 7919 + slot) % n_vocab
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = 1
        batch.n_tokens = len(rows)
        began = time.perf_counter()
        if ll.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        ll.llama_synchronize(ctx)
        return time.perf_counter() - began

    for slot in range(args.in_flight):
        decode([(slot, pos) for pos in range(args.prompt)])
    steps = shapes(args.in_flight, args.draft)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeat):
        for name, by_slot in steps.items():
            rows = [(s, args.prompt + i) for s in sorted(by_slot) for i in range(by_slot[s])]
            times[name].append(decode(rows))
            for slot in by_slot:
                ll.llama_memory_seq_rm(mem, slot, args.prompt, -1)
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    settings.add_arguments(parser, n_ctx=None)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--draft", type=int, default=4, help="drafted tokens per draft")
    parser.add_argument("--prompt", type=int, default=128, help="tokens on each slot before")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    settings.resolve(args)
    print(f"model {args.model}\nthreads {args.threads}, n_gpu_layers {args.n_gpu_layers}, "
          f"{args.prompt} tokens on each slot, median of {args.repeat}; load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    split = measure(args, unified=False)
    unified = measure(args, unified=True)
    print(f"{'step':36}{'rows':>6}{'split ms':>10}{'unified ms':>12}")
    for name, by_slot in shapes(args.in_flight, args.draft).items():
        rows = sum(by_slot.values())
        print(f"{name:36}{rows:>6}{split[name] * 1e3:>10.1f}{unified[name] * 1e3:>12.1f}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
