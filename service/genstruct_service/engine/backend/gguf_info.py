"""What a loaded GGUF model is: quantization, size, architecture, offload, from its metadata."""

from __future__ import annotations

import ctypes

import llama_cpp as ll

from genstruct_service.engine.fitting import KvLayout
from genstruct_service.engine.speculation import SpeculationSettings
from genstruct_service.engine.types import BuildInfo, EngineInfo
from genstruct_service.model_files.gguf import quantization_name

_GPU_BACKENDS = ("CUDA", "Metal", "Vulkan", "ROCm", "HIP", "SYCL", "OpenCL", "CANN", "MUSA")


def meta_str(model: int, key: str) -> str | None:
    """One GGUF metadata value as text, or None when the key is absent."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = ll.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", "replace")
        size = n + 1


def quantization(file_type: str | None) -> str:
    """The name of the model's `general.file_type` (the one table, model_files.gguf's)."""
    if file_type is None:
        return "unknown"
    try:
        return quantization_name(int(file_type))
    except ValueError:
        return file_type


def backend_name() -> str:
    """"CPU" unless this llama.cpp build can offload, then the GPU backend it was built with."""
    if not ll.llama_supports_gpu_offload():
        return "CPU"
    system = ll.llama_print_system_info().decode("utf-8", "replace")
    for name in _GPU_BACKENDS:
        if name.upper() in system.upper():
            return name
    return "GPU"


def engine_info(
    model: int, ctx: int, *, model_name: str, model_path: str, n_parallel: int,
    n_gpu_layers: int, build: BuildInfo, flash_attn: str, cache_types: tuple[str, str],
    speculation: SpeculationSettings, layout: KvLayout,
) -> EngineInfo:
    n_layer = int(ll.llama_model_n_layer(model))
    backend = backend_name()
    # llama.cpp counts the output layer as one more offloadable layer: n_gpu_layers above
    # n_layer offloads that too, but the repeating layers offloaded are at most n_layer.
    wanted = n_layer if n_gpu_layers < 0 else n_gpu_layers
    offloaded = min(wanted, n_layer) if backend != "CPU" else 0
    return EngineInfo(
        model_name=model_name,
        model_path=model_path,
        quantization=quantization(meta_str(model, "general.file_type")),
        parameter_count=int(ll.llama_model_n_params(model)),
        architecture=meta_str(model, "general.architecture") or "unknown",
        context_length=int(ll.llama_n_ctx(ctx)),
        train_context_length=int(ll.llama_model_n_ctx_train(model)),
        n_parallel=n_parallel,
        gpu_layers_offloaded=offloaded,
        total_layers=n_layer,
        backend=backend,
        build=build,
        n_batch=int(ll.llama_n_batch(ctx)),
        n_ubatch=int(ll.llama_n_ubatch(ctx)),
        threads=int(ll.llama_n_threads(ctx)),
        threads_batch=int(ll.llama_n_threads_batch(ctx)),
        flash_attn=flash_attn,
        cache_type_k=cache_types[0],
        cache_type_v=cache_types[1],
        speculation=speculation,
        kv_unified=layout.unified,
        slot_context_length=layout.slot_cells,
    )
