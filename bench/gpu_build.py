"""The GPU check's one CMake build of llama.cpp: its shared libraries and llama-server.

The bindings and llama-server run the same files: the libraries are copied into the
llama_cpp package's `lib/` folder (where `llama_cpp` and `llama_cpp._ggml` both load them
from; `LLAMA_CPP_LIB_PATH` would move only libllama), and llama-server is run with that
folder first on its library path (bench/llama_server.py checks it). Built with
`CMAKE_BUILD_RPATH_USE_ORIGIN`, so the libraries find each other wherever they are copied.

A build is named by a key over the llama.cpp version and its CMake arguments; the stage
(bench/gpu_stage.py) can build the CUDA form ahead of time on a machine with nvcc and no
GPU, and the GPU check uses it when the key matches, else compiles the same arguments from
the staged source. Standard library only: it runs under the GPU machine's own python.

    python -m bench.gpu_build key --version 0.3.36 [--cuda-arch 90]
    python -m bench.gpu_build build --source SRC --build-dir DIR --version V [--cuda-arch 90]
    python -m bench.gpu_build unpack --archive A.tar.xz --build-dir DIR
    python -m bench.gpu_build install --build-dir DIR --site SITE
    python -m bench.gpu_build builds     # where builds are kept
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tools import llama_build

# llama-server and the shared libraries as the benchmarks build them, with no -march=native:
# a build made on one machine runs on another (with every layer on the GPU the CPU kernels
# hardly matter; ggml's default x86 baseline is AVX2).
COMMON_ARGS = (*llama_build.SERVER_BUILD_ARGS, "-DGGML_NATIVE=OFF",
               "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON")
TARGETS = ("llama", "llama-server")
RECORD = "llama-build.json"
# What a build leaves for the check: the shared libraries (llama-server also links
# libllama-common, libllama-server-impl and libmtmd), the server and the record.
_KEEP = ("lib*.so*", "llama-server")


def builds_dir() -> Path:
    """Where builds are kept, one folder per key (beside llama_build's wheels)."""
    return llama_build.cache_root() / "gpu-check"


def cmake_args(cuda_arch: str | None) -> list[str]:
    args = list(COMMON_ARGS)
    if cuda_arch:
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
    return args


def key(version: str, cuda_arch: str | None) -> str:
    blob = json.dumps({"version": version, "cmake_args": cmake_args(cuda_arch)}).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _version_line(command: str, contains: str = "") -> str:
    """The first line of `command --version` that holds `contains`."""
    try:
        done = subprocess.run([command, "--version"], capture_output=True, text=True,
                              check=False)
    except OSError:
        return "absent"
    lines = [line for line in done.stdout.splitlines() if contains in line]
    return lines[0].strip() if lines else "?"


def driverless_args(stub_dir: Path, cuda_include: Path = Path("/usr/local/cuda/include")
                    ) -> list[str]:
    """Extra arguments to build the CUDA form where no NVIDIA driver is installed.

    ggml-cuda links libcuda (for its virtual memory pool), which only a driver installs. A
    stand-in with its soname that defines every function of the driver API (the names as
    cuda.h's macros make them) lets the link finish and record libcuda.so.1 as needed; at
    run time the real driver's library is loaded (the stand-in's folder stays in the build's
    RUNPATH, after $ORIGIN; it does not exist where the build runs, and each of its functions
    would fail loudly if it did). Not part of the key: the code is the same.
    """
    stub_dir.mkdir(parents=True, exist_ok=True)
    stub = stub_dir / "libcuda.so"
    if not stub.exists():
        expanded = subprocess.run(["cc", "-E", f"-I{cuda_include}", "-"],
                                  input="#include <cuda.h>\n", capture_output=True, text=True,
                                  check=True).stdout
        names = sorted(set(re.findall(r"CUresult\s+(cu\w+)\s*\(", expanded)))
        source = stub_dir / "stub.c"
        source.write_text("".join(f"int {name}(void) {{ return 999; }}\n" for name in names))
        subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub),
                        str(source)], check=True)
        # the name the linker looks for when llama-server links libggml-cuda
        (stub_dir / "libcuda.so.1").symlink_to(stub.name)
    return [f"-DCUDA_cuda_driver_LIBRARY={stub}"]


def build(source: Path, build_dir: Path, version: str, cuda_arch: str | None, *,
          jobs: int | None = None, extra: list[str] | None = None) -> Path:
    """Configure and build into `build_dir`; nothing to do if its record has the same key."""
    wanted = key(version, cuda_arch)
    done = read_record(build_dir)
    if done and done.get("key") == wanted:
        return build_dir
    # An earlier build of the same source in the folder is configured again: CMake takes
    # the new arguments and ninja recompiles only what they change.
    if _configured_source(build_dir) not in (None, source.resolve()):
        shutil.rmtree(build_dir)
    cmake = ["cmake", "-S", str(source), "-B", str(build_dir), *cmake_args(cuda_arch),
             *(extra or [])]
    if shutil.which("ninja"):
        cmake += ["-G", "Ninja"]
    subprocess.run(cmake, check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", *TARGETS,
                    "-j", str(jobs or os.cpu_count() or 1)], check=True)
    record = {
        "key": wanted, "version": version, "profile": "gpu-check",
        "cuda_architectures": cuda_arch, "cmake_args": cmake_args(cuda_arch),
        "compiler": _version_line("c++"),
        "nvcc": _version_line("nvcc", "release") if cuda_arch else None,
    }
    (build_dir / "bin" / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return build_dir


def _configured_source(build_dir: Path) -> Path | None:
    """The source folder an existing CMake build folder was configured from."""
    try:
        cache = (build_dir / "CMakeCache.txt").read_text(errors="replace")
    except OSError:
        return None
    for line in cache.splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            return Path(line.split("=", 1)[1]).resolve()
    return None


def read_record(build_dir: Path) -> dict[str, object] | None:
    try:
        record: dict[str, object] = json.loads((build_dir / "bin" / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record


def kept_files(build_dir: Path) -> list[Path]:
    """The files of a build the check uses (symbolic links to them included)."""
    bin_dir = build_dir / "bin"
    found = {p for pattern in _KEEP for p in bin_dir.glob(pattern)}
    return sorted(found | {bin_dir / RECORD})


def pack(build_dir: Path, archive: Path) -> Path:
    """The kept files, without their symbol tables, as a .tar.xz for the stage."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in kept_files(build_dir):
            copy = Path(tmp) / path.name
            shutil.copy2(path, copy, follow_symlinks=False)
            if not copy.is_symlink() and copy.name != RECORD and shutil.which("strip"):
                subprocess.run(["strip", "--strip-unneeded", str(copy)], check=True)
        with tarfile.open(archive, "w:xz", preset=9) as tar:
            for copy in sorted(Path(tmp).iterdir()):
                tar.add(copy, arcname=f"bin/{copy.name}")
    return archive


def unpack(archive: Path, build_dir: Path) -> Path:
    build_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(build_dir, filter="data")
    return build_dir


def install(build_dir: Path, site: Path) -> Path:
    """Copy the libraries and the record into SITE/llama_cpp/lib (the package must be there)."""
    lib = site / "llama_cpp" / "lib"
    if not (site / "llama_cpp" / "__init__.py").exists():
        raise SystemExit(f"no llama_cpp package in {site}: install its wheel first")
    lib.mkdir(exist_ok=True)
    for path in kept_files(build_dir):
        if path.name == "llama-server":
            continue
        target = lib / path.name
        if target.exists() or target.is_symlink():
            target.unlink()
        shutil.copy2(path, target, follow_symlinks=False)
    return lib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["key", "build", "unpack", "install", "builds"])
    parser.add_argument("--version", help="the llama-cpp-python version of the source")
    parser.add_argument("--cuda-arch", default=None, help="e.g. 90; none: the CPU form")
    parser.add_argument("--source", type=Path)
    parser.add_argument("--build-dir", type=Path)
    parser.add_argument("--site", type=Path)
    parser.add_argument("--archive", type=Path)
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "key":
        print(key(args.version, args.cuda_arch))
    elif args.command == "build":
        print(build(args.source, args.build_dir, args.version, args.cuda_arch, jobs=args.jobs))
    elif args.command == "unpack":
        print(unpack(args.archive, args.build_dir))
    elif args.command == "install":
        print(install(args.build_dir, args.site))
    else:
        print(builds_dir())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
