"""How llama.cpp is compiled: one definition for the local install, the image and llama-server.

llama-cpp-python builds llama.cpp from source, so this project decides its flags. Profiles:

- ``native`` (a local install, the default): code for the CPU that builds it (AVX2, AVX-512,
  VNNI... as it reports them), but never ggml's AMX kernels: on some hosts that report AMX
  (Sapphire Rapids class Xeons in a VM) they fault with SIGILL on their first matrix
  multiply, which kills the process.
- ``portable`` (the image): no ``-march=native``; every x86-64 CPU variant of ggml's CPU
  backend is built as its own library and the best one the running CPU supports is loaded
  at run time (``GGML_BACKEND_DL``, ``GGML_CPU_ALL_VARIANTS``). The AMX variant is removed
  after the install for the same reason, so an AMX host loads the AVX-512 one below it.
  With CUDA, the architectures are explicit (see ``CUDA_ARCHITECTURES``): no GPU is needed
  to build.

Overrides, from the environment:

- ``LLAMA_CMAKE_ARGS``: more CMake arguments, after the profile's, so they win
  (e.g. ``-DGGML_CUDA=on`` or ``-DGGML_METAL=on``).
- ``LLAMA_ALLOW_AMX=1``: keep the AMX kernels, on hosts where they work.
- ``LLAMA_CUDA_ARCHITECTURES``: the CUDA architectures of a CUDA build.
- ``LLAMA_WHEEL_CACHE``: where built wheels are kept (default ``~/.cache/genstruct-grpc``).

pip caches a built wheel by its version alone, whatever flags built it, so the install never
goes through pip's cache: the wheel is built here into a folder keyed by everything that
shapes the machine code (version, profile, CMake arguments, compiler flags, compiler, and for
``native`` the CPU's feature flags), and installed from there. Another set of flags is
another folder; the same set is built once per machine.

    python tools/llama_build.py install --python .venv/bin/python [--profile portable]
    python tools/llama_build.py cmake-args [--profile portable]
    python tools/llama_build.py info

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("native", "portable")
AMX_OFF = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
# A100, A10/RTX 3090, L4/RTX 4090, H100/H200.
CUDA_ARCHITECTURES = "80;86;89;90"
# The CPU variants of a portable build that use AMX (see ggml/src/CMakeLists.txt).
AMX_VARIANTS = ("sapphirerapids",)
# llama-server and the shared libraries beside it, as the benchmarks build them: Release, no
# downloads (curl, TLS, the prebuilt web UI), no tests or examples (bench/llama_server.py,
# bench/gpu_build.py).
SERVER_BUILD_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
)
# Where the installed build describes itself, relative to the environment's prefix.
BUILD_INFO = Path("share") / "genstruct-grpc" / "llama-build.json"


def pinned_version() -> str:
    """The llama-cpp-python version pyproject.toml pins (the one source of it)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    found = re.search(r'"llama-cpp-python==([^";\s]+)"', text)
    if found is None:
        raise SystemExit("pyproject.toml must pin llama-cpp-python with ==")
    return found.group(1)


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _env_args() -> list[str]:
    return shlex.split(os.environ.get("LLAMA_CMAKE_ARGS", ""))


def _allow_amx() -> bool:
    return os.environ.get("LLAMA_ALLOW_AMX", "") not in ("", "0")


def _wants_cuda(args: list[str]) -> bool:
    on = ("-DGGML_CUDA=on", "-DGGML_CUDA=ON", "-DGGML_CUDA=1", "-DGGML_CUDA:BOOL=ON")
    return any(arg in on for arg in args)


def cmake_args(profile: str) -> list[str]:
    """The CMake arguments of a profile, the user's own last."""
    extra = _env_args()
    if profile == "native":
        args = ["-DGGML_NATIVE=ON"]
    elif profile == "portable":
        # The backends are libraries of their own, installed beside libllama in the wheel
        # (typed STRING: CMake would make a relative PATH absolute, in the build's temp dir).
        args = ["-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON",
                "-DGGML_BACKEND_DIR:STRING=llama_cpp/lib"]
        if _is_x86():
            args.append("-DGGML_CPU_ALL_VARIANTS=ON")
    else:
        raise SystemExit(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if _wants_cuda(extra) and not any("CMAKE_CUDA_ARCHITECTURES" in arg for arg in extra):
        archs = os.environ.get("LLAMA_CUDA_ARCHITECTURES") or (
            CUDA_ARCHITECTURES if profile == "portable" else "native"
        )
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
    return args + extra


def compiler_flags(profile: str) -> dict[str, str]:
    """CFLAGS / CXXFLAGS for the build: the caller's own, plus AMX off where it applies."""
    flags = {name: os.environ.get(name, "") for name in ("CFLAGS", "CXXFLAGS")}
    if profile == "native" and _is_x86() and not _allow_amx():
        # gcc and clang let an explicit -mno-* win over -march=native, wherever it stands.
        for name in flags:
            flags[name] = " ".join(filter(None, (flags[name], *AMX_OFF)))
    return flags


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError:
        return "absent"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


@dataclass(frozen=True)
class Build:
    """Everything that shapes the compiled code; its hash names the wheel's folder."""

    version: str
    profile: str
    cmake_args: list[str]
    cflags: str
    cxxflags: str
    allow_amx: bool
    machine: str
    compiler: str
    cpu_flags: str  # only for `native`: its code is for this CPU

    @property
    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def describe(profile: str) -> Build:
    flags = compiler_flags(profile)
    args = cmake_args(profile)
    compiler = " / ".join(
        _first_line([os.environ.get(var, default), "--version"])
        for var, default in (("CC", "cc"), ("CXX", "c++"))
    )
    if _wants_cuda(args):
        compiler += " / " + _first_line(["nvcc", "--version"])
    return Build(
        version=pinned_version(),
        profile=profile,
        cmake_args=args,
        cflags=flags["CFLAGS"],
        cxxflags=flags["CXXFLAGS"],
        allow_amx=_allow_amx(),
        machine=platform.machine(),
        compiler=compiler,
        cpu_flags=_cpu_flags() if profile == "native" else "",
    )


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genstruct-grpc"
    return Path(os.environ.get("LLAMA_WHEEL_CACHE") or default)


def wheel_cache() -> Path:
    return cache_root() / "llama-cpp-python"


def sdist_cache() -> Path:
    return cache_root() / "sdist"


def fetch_sdist(version: str, dest: Path) -> Path:
    """The llama-cpp-python source archive of `version`, downloaded through pip if missing."""
    archive = dest / f"llama_cpp_python-{version}.tar.gz"
    if not archive.exists():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
             "--no-deps", f"llama-cpp-python=={version}", "-d", str(dest)],
            check=True,
        )
    return archive


def vendored_source(version: str, dest: Path) -> Path:
    """The llama.cpp source the sdist vendors, extracted under `dest`."""
    source = dest / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        with tarfile.open(fetch_sdist(version, dest)) as tar:
            tar.extractall(dest, filter="data")
        if not (source / "CMakeLists.txt").exists():
            raise RuntimeError(f"the llama-cpp-python {version} sdist holds no vendor/llama.cpp")
    return source


def build_wheel(build: Build, python: str) -> Path:
    """The wheel for `build`, from the keyed cache or built into it now."""
    folder = wheel_cache() / f"{build.version}-{build.profile}-{build.key}"
    found = sorted(folder.glob("llama_cpp_python-*.whl"))
    if found:
        return found[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        archive = fetch_sdist(build.version, sdist_cache())
        env = dict(os.environ, CMAKE_ARGS=shlex.join(build.cmake_args),
                   CFLAGS=build.cflags, CXXFLAGS=build.cxxflags)
        print(f"building llama-cpp-python {build.version} ({build.profile}): "
              f"{shlex.join(build.cmake_args)}; CFLAGS={build.cflags!r} "
              "(several minutes, once per set of flags)", flush=True)
        subprocess.run(
            [python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--wheel-dir",
             str(staging / "wheel"), str(archive)],
            env=env, check=True,
        )
        wheel = next((staging / "wheel").glob("llama_cpp_python-*.whl"))
        (staging / "wheel" / "build.json").write_text(json.dumps(asdict(build), indent=2))
        (staging / "wheel").rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / wheel.name


def _site_info(python: str) -> tuple[Path, Path | None]:
    """The environment's prefix and the installed llama_cpp package folder (if any)."""
    code = (
        "import sys, importlib.util as u; s = u.find_spec('llama_cpp');"
        "print(sys.prefix); print(s.submodule_search_locations[0] if s else '')"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    prefix, package = out.stdout.splitlines()
    return Path(prefix), Path(package) if package else None


def installed(python: str) -> dict[str, object] | None:
    prefix, _ = _site_info(python)
    try:
        info: dict[str, object] = json.loads((prefix / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info


def install(profile: str, python: str) -> None:
    """Install the build of `profile` into `python`'s environment, unless it is there."""
    build = describe(profile)
    current = installed(python)
    prefix, package = _site_info(python)
    if current is not None and current.get("key") == build.key and package is not None:
        return
    wheel = build_wheel(build, python)
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
    )
    prefix, package = _site_info(python)
    if package is None:
        raise SystemExit(f"{wheel.name} installed, but llama_cpp does not import from {python}")
    removed = [] if build.allow_amx else _remove_amx_variants(package)
    record = {**asdict(build), "key": build.key, "wheel": str(wheel), "removed": removed}
    target = prefix / BUILD_INFO
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2) + "\n")
    print(f"llama-cpp-python {build.version} ({build.profile}, build {build.key}) installed"
          + (f"; removed {', '.join(removed)}" if removed else ""), flush=True)


def _remove_amx_variants(package: Path) -> list[str]:
    removed = []
    for variant in AMX_VARIANTS:
        for library in package.glob(f"lib/*ggml-cpu-{variant}.*"):
            library.unlink()
            removed.append(library.name)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["install", "cmake-args", "info"])
    parser.add_argument("--profile", choices=PROFILES,
                        default=os.environ.get("LLAMA_PROFILE") or "native")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter of the environment to install into")
    args = parser.parse_args(argv)
    if args.command == "install":
        install(args.profile, args.python)
    elif args.command == "cmake-args":
        print(shlex.join(cmake_args(args.profile)))
    else:
        build = describe(args.profile)
        print(json.dumps({**asdict(build), "key": build.key}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
