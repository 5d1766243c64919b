"""Persistent CPU thread pools for a llama.cpp context, as llama-server attaches them.

Without one, ggml makes a pool for every graph it computes and ends its threads after: a
thread start per ubatch, and workers that never poll for the next one. llama-server (its
common init) creates a pool of n_threads (and one of n_threads_batch when they differ)
with ggml's default hybrid polling, and attaches them to the context; the engine does
the same here. The pool functions are the CPU backend's, found through its registry so
that a build loading backends at run time finds them too.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any

from llama_cpp import llama_cpp as _llama

from genstruct_service.engine.backend.build_info import libggml

log = logging.getLogger(__name__)

_MAX_N_THREADS = 512  # GGML_MAX_N_THREADS
_DEVICE_CPU = 0  # GGML_BACKEND_DEVICE_TYPE_CPU


class _Params(ctypes.Structure):
    """struct ggml_threadpool_params"""

    _fields_ = [
        ("cpumask", ctypes.c_bool * _MAX_N_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


_NEW = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_Params))
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _bind(library: Any, name: str, restype: Any, *argtypes: Any) -> Any:
    function = getattr(library, name)
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


_ggml = libggml()
_params_init = _bind(_ggml, "ggml_threadpool_params_init", None, ctypes.POINTER(_Params),
                     ctypes.c_int)  # fmt: skip
_dev_by_type = _bind(_ggml, "ggml_backend_dev_by_type", ctypes.c_void_p, ctypes.c_int)
_dev_reg = _bind(_ggml, "ggml_backend_dev_backend_reg", ctypes.c_void_p, ctypes.c_void_p)
_proc_address = _bind(_ggml, "ggml_backend_reg_get_proc_address", ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_char_p)  # fmt: skip
_attach = _bind(_llama._lib, "llama_attach_threadpool", None, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_void_p)  # fmt: skip
_detach = _bind(_llama._lib, "llama_detach_threadpool", None, ctypes.c_void_p)


@dataclass
class ThreadPools:
    """The pools attached to one context; `close` after the context is freed."""

    generate: int
    batch: int | None
    _free: Any

    def close(self) -> None:
        for pool in (self.generate, self.batch):
            if pool:
                self._free(pool)
        self.generate, self.batch = 0, None


def attach(ctx: Any, n_threads: int, n_threads_batch: int) -> ThreadPools | None:
    """Attach persistent pools to `ctx`; None (ggml's own per-graph pools stay) if this
    build's CPU backend does not offer them."""
    device = _dev_by_type(_DEVICE_CPU)
    registry = _dev_reg(device) if device else None
    new = _proc_address(registry, b"ggml_threadpool_new") if registry else None
    free = _proc_address(registry, b"ggml_threadpool_free") if registry else None
    if not new or not free:
        log.warning("this llama.cpp build offers no CPU thread pools; ggml makes one per graph")
        return None
    make, release = _NEW(new), _FREE(free)
    batch_pool: int | None = None
    paused = False
    if n_threads_batch != n_threads:
        # as llama.cpp's common init: the batch pool runs first, the other starts paused
        batch_params = _Params()
        _params_init(ctypes.byref(batch_params), n_threads_batch)
        batch_pool = make(ctypes.byref(batch_params))
        if not batch_pool:
            log.warning("cannot create a thread pool of %d threads", n_threads_batch)
            return None
        paused = True
    params = _Params()
    _params_init(ctypes.byref(params), n_threads)
    params.paused = paused
    pool = make(ctypes.byref(params))
    if not pool:
        if batch_pool:
            release(batch_pool)
        log.warning("cannot create a thread pool of %d threads", n_threads)
        return None
    _attach(ctx, pool, batch_pool)
    return ThreadPools(pool, batch_pool, release)


def detach(ctx: Any) -> None:
    _detach(ctx)
