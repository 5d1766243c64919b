"""Build and run llama.cpp's own `llama-server`, the peer the engine is measured against.

The server is built from the llama.cpp source vendored in the llama-cpp-python sdist of the
installed version, with the flags the bindings were built with (tools/llama_build.py), as
shared libraries, and runs on the very `libllama`/`libggml*` files the
installed bindings load (their folder first on LD_LIBRARY_PATH): both peers execute the same
machine code, so a difference between them is the serving loop's, not the compiler's or the
linkage's (a static build measured about 2% faster here). Everything lives under the
git-ignored `bench/.build/`.

    python -m bench.llama_server build      # download the sdist, cmake-build llama-server
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tools import llama_build

BUILD_ROOT = Path(__file__).resolve().parent / ".build"


def installed_version() -> str:
    return metadata.version("llama-cpp-python")


def _build() -> llama_build.Build:
    """The flags the installed bindings were built with, so llama-server gets the same."""
    record = llama_build.installed(sys.executable) or {}
    profile = str(record.get("profile") or "native")
    return llama_build.describe(profile)


def _binary_path(version: str, key: str) -> Path:
    return BUILD_ROOT / f"server-shared-{version}-{key}" / "bin" / "llama-server"


def bindings_lib_dir() -> Path:
    """The folder of the shared libraries the installed llama-cpp-python loads."""
    from genstruct_service.engine.backend.build_info import library_dir

    return library_dir()


def build(version: str | None = None, jobs: int | None = None) -> Path:
    """Build only the `llama-server` target (Release, no curl, no web UI download)."""
    version = version or installed_version()
    flags = _build()
    binary = _binary_path(version, flags.key)
    if binary.exists():
        return binary
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed")
    source = llama_build.vendored_source(version, llama_build.sdist_cache())
    build_dir = binary.parent.parent
    env = dict(os.environ, CFLAGS=flags.cflags, CXXFLAGS=flags.cxxflags)
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(build_dir), *flags.cmake_args,
         *llama_build.SERVER_BUILD_ARGS],
        check=True, env=env,
    )
    subprocess.run(
        ["cmake", "--build", str(build_dir), "--config", "Release", "--target", "llama-server",
         "-j", str(jobs or os.cpu_count() or 1)],
        check=True, env=env,
    )
    if not binary.exists():
        raise RuntimeError(f"the build finished but {binary} is missing")
    return binary


# A llama-server built elsewhere on the bindings' libraries (bench/gpu_check.sh sets it to
# the one build it makes of both).
BINARY_ENV = "GENSTRUCT_LLAMA_SERVER"


def find_binary(version: str | None = None) -> Path | None:
    if os.environ.get(BINARY_ENV):
        given = Path(os.environ[BINARY_ENV])
        if not given.is_file():
            raise RuntimeError(f"{BINARY_ENV}={given} is not a file")
        return given
    binary = _binary_path(version or installed_version(), _build().key)
    return binary if binary.exists() else None


def ensure_built() -> Path | None:
    """The server binary, built first if needed; None (and the reason printed) if it cannot be."""
    found = find_binary()
    if found is not None:
        return found
    print("building llama-server from the llama-cpp-python sdist (several minutes, once)...",
          flush=True)
    try:
        return build()
    except (OSError, RuntimeError, subprocess.CalledProcessError, tarfile.TarError) as exc:
        print(f"llama-server could not be built ({exc}); skipping that peer", flush=True)
        return None


def _free_port() -> int:
    # llama-server takes no port 0, so a port is picked here; the race is harmless in a benchmark.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    url: str

    def post(self, path: str, body: dict[str, object], timeout: float = 600.0) -> dict[str, object]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            result: dict[str, object] = json.load(response)
            return result


@contextmanager
def serve(
    binary: Path, model_path: str, *, n_parallel: int, settings: Sequence[str],
    extra: Sequence[str] = (),
) -> Iterator[RunningServer]:
    """Start llama-server, wait for /health, and stop it on exit.

    `settings` are its context flags, as bench.settings.server_flags gives them.
    """
    port = _free_port()
    args = [
        str(binary), "-m", model_path, "--host", "127.0.0.1", "--port", str(port),
        "--parallel", str(n_parallel), *settings,
        "--no-webui", *extra,
    ]
    log = open(BUILD_ROOT / "llama-server.log", "wb")  # noqa: SIM115 - closed below
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(bindings_lib_dir()), env.get("LD_LIBRARY_PATH", "")) if p
    )
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(process, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become healthy in 300 s")
            time.sleep(0.2)
        _check_libraries(process.pid)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _check_libraries(pid: int) -> None:
    """Refuse to measure a server that loaded other ggml/llama libraries than the bindings'."""
    lib_dir = str(bindings_lib_dir())
    paths = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()}
    mapped = {p for p in paths if Path(p).name.startswith(("libggml", "libllama.so"))}
    foreign = sorted(m for m in mapped if not m.startswith(lib_dir))
    if not mapped or foreign:
        raise RuntimeError(
            f"llama-server must run on the bindings' libraries in {lib_dir}, "
            f"but it mapped {foreign or 'none'}; rebuild it: `python -m bench.llama_server build`"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "path"])
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build(jobs=args.jobs))
    else:
        found = find_binary()
        if found is None:
            print("not built; run `python -m bench.llama_server build`", file=sys.stderr)
            return 1
        print(found)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
