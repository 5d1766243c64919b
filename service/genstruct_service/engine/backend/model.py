"""Loading a GGUF model and its llama.cpp context, as one value that the runner holds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as ll

from genstruct_service.engine.backend import llama_log, threadpool
from genstruct_service.engine.backend.build_info import load_backends, read_build_info
from genstruct_service.engine.backend.tokenizer import LlamaTokenizer
from genstruct_service.engine.fitting import KvLayout
from genstruct_service.engine.types import BuildInfo
from genstruct_service.errors import ModelError

log = logging.getLogger(__name__)

_ALL_LAYERS = 0x7FFFFFFF
FLASH_ATTN = {
    "auto": ll.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": ll.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
CACHE_TYPES = {"f16": ll.GGML_TYPE_F16, "q8_0": ll.GGML_TYPE_Q8_0, "q4_0": ll.GGML_TYPE_Q4_0}


@dataclass(frozen=True, slots=True)
class ContextSettings:
    """What the model and its context are made with (checked by the engine beforehand)."""

    model_path: str
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_parallel: int
    n_gpu_layers: int  # -1: all
    n_threads: int
    n_threads_batch: int
    flash_attn: str  # "auto", "on" or "off"
    cache_types: tuple[str, str]
    kv_unified: bool
    n_outputs_max: int  # the most rows with logits in one batch


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model, its context and what was read from them; `free` it once."""

    model: Any
    ctx: Any
    mem: Any
    vocab: Any
    tokenizer: LlamaTokenizer
    layout: KvLayout
    pools: threadpool.ThreadPools | None
    flash_attn: str  # "on" or "off" as llama.cpp resolved the setting
    build: BuildInfo

    def free(self) -> None:
        threadpool.detach(self.ctx)
        ll.llama_free(self.ctx)
        if self.pools is not None:
            self.pools.close()
        ll.llama_model_free(self.model)


def load(settings: ContextSettings) -> LoadedModel:
    """Load the model and create its context (ModelError when either fails)."""
    path = settings.model_path
    if not Path(path).is_file():
        raise ModelError(f"model file not found: {path}")
    ll.llama_backend_init()
    load_backends()
    # llama-cpp-python prints every llama.cpp log line unless its logger has a level
    quiet = logging.getLogger("llama-cpp-python")
    if quiet.level == logging.NOTSET:
        quiet.setLevel(logging.WARNING)
    mparams = ll.llama_model_default_params()
    mparams.n_gpu_layers = _ALL_LAYERS if settings.n_gpu_layers < 0 else settings.n_gpu_layers
    model = ll.llama_model_load_from_file(path.encode(), mparams)
    if not model:
        raise ModelError(f"llama.cpp could not load {path} (not a GGUF model?)")
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = settings.n_ctx
    cparams.n_batch = settings.n_batch
    cparams.n_ubatch = settings.n_ubatch
    cparams.n_seq_max = settings.n_parallel
    cparams.n_threads = settings.n_threads
    cparams.n_threads_batch = settings.n_threads_batch
    cparams.kv_unified = settings.kv_unified
    # Sliding-window layers (Gemma 2 and 3) keep only their window plus a ubatch of cells,
    # as llama-server does; llama.cpp's own default sizes them like the full layers. Its
    # price, that cells leaving the window are gone, costs nothing here: no prompt is
    # reused, and a rejected draft only removes the newest cells. (Prefix reuse across
    # requests would need swa_full, or llama-server's checkpoints.)
    cparams.swa_full = False
    # llama.cpp sizes its worst-case compute buffer by this, as llama-server sets it: the
    # output layer over that many rows. Its default is n_batch rows: at 512, a compute
    # buffer of 514 MiB on Gemma 3 (262,144 logits a row) against 21 MiB for 4 slots. A
    # batch with more rows with logits than this aborts the process, so every plan stays
    # within it.
    cparams.n_outputs_max = settings.n_outputs_max
    cparams.no_perf = True
    cparams.flash_attn_type = FLASH_ATTN[settings.flash_attn]
    cparams.type_k = CACHE_TYPES[settings.cache_types[0]]
    cparams.type_v = CACHE_TYPES[settings.cache_types[1]]
    with llama_log.captured() as lines:
        ctx = ll.llama_init_from_model(model, cparams)
    flash_attn = llama_log.flash_attn_in_force(settings.flash_attn, lines)
    if not ctx:
        ll.llama_model_free(model)
        raise ModelError("llama.cpp could not create a context (n_ctx too large for memory?)")
    try:
        # split, llama.cpp rounds each slot's stream up to a multiple of 256 cells
        layout = KvLayout(int(ll.llama_n_ctx(ctx)), settings.n_parallel, settings.kv_unified)
        pools = threadpool.attach(ctx, settings.n_threads, settings.n_threads_batch)
        vocab = ll.llama_model_get_vocab(model)
        tokenizer = LlamaTokenizer(vocab)
        build = read_build_info()
    except BaseException:
        ll.llama_free(ctx)
        ll.llama_model_free(model)
        raise
    log.info("llama.cpp build: %s", build.summary())
    if build.has_amx:
        log.warning(
            "this llama.cpp build uses AMX kernels, which crash (SIGILL) on some hosts "
            "that report AMX; if this process dies in the warm-up below, reinstall "
            "without them: `make` (tools/llama_build.py) leaves them out unless "
            "LLAMA_ALLOW_AMX=1"
        )
    return LoadedModel(
        model=model, ctx=ctx, mem=ll.llama_get_memory(ctx), vocab=vocab, tokenizer=tokenizer,
        layout=layout, pools=pools, flash_attn=flash_attn, build=build,
    )
