"""Read which llama.cpp build this process runs: version, profile, backends, CPU features.

A build with dynamically loaded backends (`GGML_BACKEND_DL`, the image's portable build) has
none until they are loaded from the bindings' library folder; `load_backends` does that
once, before any model is loaded, and is a no-op for a build with the backends linked in.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import llama_cpp as ll
from llama_cpp import _ggml

from genstruct_service.engine.types import BuildInfo

# Where tools/llama_build.py records the build it installed (its BUILD_INFO), under the
# environment's prefix.
BUILD_RECORD = Path("share") / "genstruct-grpc" / "llama-build.json"
_DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "accelerator"}
_CPU_VARIANT = re.compile(r"ggml-cpu-([\w.]+)\.(?:so|dylib|dll)$")
_FEATURE = re.compile(r"(\w+) = 1\b")
_SECTION = re.compile(r"(?:^|\|)\s*(\w+) : ")


def library_dir() -> Path:
    """The folder of the shared libraries the bindings load."""
    return Path(ll.__file__).resolve().parent / "lib"


def _libggml() -> Any:
    """The libggml that libllama itself uses.

    A wheel holds each library under several names as separate copies (libggml.so,
    libggml.so.0, ...), and libllama links the soname one; the bindings' own `_ggml` handle
    opens another copy, with a backend registry of its own. Loading backends there would
    leave libllama with none, so bind to the file libllama loaded.
    """
    for name in ("libggml.so.0", "libggml.0.dylib"):
        path = library_dir() / name
        if path.exists():
            return ctypes.CDLL(str(path))
    return _ggml.libggml


_LIBGGML = _libggml()


def libggml() -> Any:
    """The libggml libllama uses (see _libggml), for bindings of its functions elsewhere."""
    return _LIBGGML


def _bind(name: str, restype: Any, *argtypes: Any) -> Any:
    function = getattr(_LIBGGML, name)
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


_reg_count = _bind("ggml_backend_reg_count", ctypes.c_size_t)
_reg_get = _bind("ggml_backend_reg_get", ctypes.c_void_p, ctypes.c_size_t)
_reg_name = _bind("ggml_backend_reg_name", ctypes.c_char_p, ctypes.c_void_p)
_dev_count = _bind("ggml_backend_dev_count", ctypes.c_size_t)
_dev_get = _bind("ggml_backend_dev_get", ctypes.c_void_p, ctypes.c_size_t)
_dev_name = _bind("ggml_backend_dev_name", ctypes.c_char_p, ctypes.c_void_p)
_dev_description = _bind("ggml_backend_dev_description", ctypes.c_char_p, ctypes.c_void_p)
_dev_type = _bind("ggml_backend_dev_type", ctypes.c_int, ctypes.c_void_p)
_dev_memory = _bind(
    "ggml_backend_dev_memory", None, ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t),
)
_load_all_from_path = _bind("ggml_backend_load_all_from_path", None, ctypes.c_char_p)


def load_backends() -> None:
    """Register llama.cpp's backends if this build loads them at run time (idempotent)."""
    if _reg_count() == 0:
        _load_all_from_path(str(library_dir()).encode())


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", "replace")


def _device(index: int) -> str:
    device = _dev_get(index)
    kind = _DEVICE_TYPES.get(_dev_type(device), "device")
    described = f"{_text(_dev_name(device))} ({kind}): {_text(_dev_description(device))}"
    if kind != "CPU":
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        _dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        if total.value:
            described += f", {total.value / 2**30:.1f} GiB"
    return described


def _cpu_variant() -> str:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for line in maps.splitlines():
        found = _CPU_VARIANT.search(line)
        if found:
            return found.group(1)
    return "built in"


def cpu_features(system_info: str) -> tuple[str, ...]:
    """The features set in the CPU section of llama_print_system_info().

    The text reads "CPU : SSE3 = 1 | AVX2 = 1 | ... | CUDA : ARCHS = 890 | ...".
    """
    parts = _SECTION.split(system_info)
    for name, body in zip(parts[1::2], parts[2::2], strict=False):
        if name == "CPU":
            return tuple(_FEATURE.findall(body))
    return ()


def _record() -> dict[str, Any]:
    """The build's record: where tools/llama_build.py installed it, or beside the libraries
    (a build copied into the package, as bench/gpu_build.py does)."""
    for path in (Path(sys.prefix) / BUILD_RECORD, library_dir() / BUILD_RECORD.name):
        try:
            record: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        return record
    return {}


def read_build_info() -> BuildInfo:
    """Read the running build (after `load_backends`)."""
    system = _text(ll.llama_print_system_info()).strip()
    record = _record()
    return BuildInfo(
        llama_cpp_python=metadata.version("llama-cpp-python"),
        profile=str(record.get("profile") or "unknown"),
        build_key=str(record.get("key") or ""),
        backends=tuple(_text(_reg_name(_reg_get(i))) for i in range(_reg_count())),
        devices=tuple(_device(i) for i in range(_dev_count())),
        cpu_variant=_cpu_variant(),
        cpu_features=cpu_features(system),
        system_info=system,
    )
