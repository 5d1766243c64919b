"""Stage what the GPU check needs on a machine with no network: one folder to carry there.

The lent GPU machine has CUDA, cmake, ninja and a python with numpy, jinja2, sentencepiece
and the like (IMAGE_PACKAGES), but no package index and no downloads, and what travels to it
is at most 64 MiB. This fills one git-ignored folder with the rest:

- `llama.cpp.tar.xz`: the llama.cpp source that the pinned llama-cpp-python vendors, without
  its models, docs, tests, examples and the other GPU backends;
- `wheels/`: llama-cpp-python's Python part (built without its libraries: bench/gpu_build.py
  puts the check's own build there) and the packages the image lacks, at the versions this
  environment has, for each python version asked (`requirements.txt` names them);
- `tokenizer/`: the synthetic model's tokenizer (bench/synthetic_model.py);
- with `--cuda-arch`, `llama-<key>.tar.xz`: the CUDA build made here ahead of time (where
  nvcc and cuBLAS are; no GPU or driver is needed), so the GPU machine skips its compile;
- `manifest.json`: what is there, and the keys.

    python -m bench.gpu_stage [--out bench/.build/gpu-stage] [--cuda-arch 90]

Run it from the project's environment (`make gpu-stage`): the versions it stages are the
ones that environment resolved.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from bench import gpu_build, synthetic_model
from tools import llama_build

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / ".build" / "gpu-stage"
# What the check imports that the GPU machine's image does not have (or has at a version
# the generated stubs refuse: grpcio and protobuf). The rehearsal in the tests runs the
# check with IMAGE_PACKAGES alone plus these, so a missing one fails there first.
CARRIED = (
    "grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-status", "protobuf",
    "googleapis-common-protos", "pydantic", "pydantic-core", "pydantic-settings",
    "python-dotenv", "typing-inspection", "annotated-types", "gguf", "diskcache",
)
# The packages of the GPU machine's image the check relies on (device/KINDS.md lists them).
IMAGE_PACKAGES = ("numpy", "jinja2", "sentencepiece", "pyyaml", "tqdm", "requests",
                  "typing-extensions", "prometheus-client", "psutil")
# The GPU machine's python.
IMAGE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")
# Parts of the llama.cpp source the check's build never reads.
# (scripts/ and licenses/ are read by the build: the web UI's assets, the license notice.)
SOURCE_SKIP_TOP = {".git", ".github", "models", "docs", "tests", "examples", "benches",
                   "pocs", "media", "gguf-py", "conversion", "requirements", "skills", "ci"}
SOURCE_KEEP_BACKENDS = {"ggml-cpu", "ggml-cuda", "ggml-blas"}


def _trim(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(info.name).parts
    if len(parts) > 1 and parts[1] in SOURCE_SKIP_TOP:
        return None
    # parts[3] is a folder where more parts follow: a backend's own sources
    if (len(parts) > 4 and parts[1:3] == ("ggml", "src") and parts[3].startswith("ggml-")
            and parts[3] not in SOURCE_KEEP_BACKENDS):
        return None
    return info


def stage_source(source: Path, out: Path) -> Path:
    archive = out / "llama.cpp.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(source, arcname="llama.cpp", filter=_trim)
    return archive


def bindings_wheel(sdist_root: Path, wheels: Path) -> Path:
    """llama-cpp-python's Python files as a wheel, built with none of its libraries."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "src"
        tree.mkdir()
        for name in ("pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE.md"):
            shutil.copy2(sdist_root / name, tree / name)
        shutil.copytree(sdist_root / "llama_cpp", tree / "llama_cpp")
        env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--wheel-dir", str(wheels), str(tree)], check=True, env=env)
    (wheel,) = wheels.glob("llama_cpp_python-*.whl")
    return wheel


def pins() -> dict[str, str]:
    """CARRIED at the versions this environment has."""
    return {name: metadata.version(name) for name in CARRIED}


def download(pinned: dict[str, str], pythons: list[str], wheels: Path) -> None:
    for python in pythons:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
             *platforms, "-d", str(wheels), *(f"{n}=={v}" for n, v in pinned.items())],
            check=True,
        )


def prebuild(source: Path, version: str, cuda_arch: str, out: Path, jobs: int | None) -> Path:
    """The CUDA build of the check, made here and packed for the stage."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("--cuda-arch needs nvcc (and cuBLAS) on this machine")
    # nvcc may be a wrapper script: look where the toolkit usually is, too
    toolkits = sorted({Path(nvcc).resolve().parent.parent,
                       Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))})
    if not any((toolkit / "include" / "cublas_v2.h").exists() for toolkit in toolkits):
        # found before a compile of an hour on a small machine, not after
        raise SystemExit(
            f"--cuda-arch needs cuBLAS in the CUDA toolkit: no include/cublas_v2.h in "
            f"{' or '.join(map(str, toolkits))}. Where the toolkit has none, the nvidia-cublas"
            " wheel of its major version has it: copy the wheel's nvidia/cu*/include/* into"
            " include/ and its lib/*.so.* into lib64/ (with unversioned links), then stage"
            " again")
    build_dir = (gpu_build.builds_dir() / f"build-{gpu_build.key(version, cuda_arch)}").resolve()
    extra = []
    if not any(Path(p).exists() for p in ("/usr/lib/x86_64-linux-gnu/libcuda.so",
                                          "/usr/local/cuda/lib64/stubs/libcuda.so")):
        extra = gpu_build.driverless_args(gpu_build.builds_dir() / "stubs")
    gpu_build.build(source, build_dir, version, cuda_arch, jobs=jobs, extra=extra)
    return gpu_build.pack(build_dir, out / f"llama-{gpu_build.key(version, cuda_arch)}.tar.xz")


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def stage(out: Path, pythons: list[str], cuda_arch: str | None,
          jobs: int | None) -> dict[str, object]:
    version = llama_build.pinned_version()
    source = llama_build.vendored_source(version, llama_build.sdist_cache()).resolve()
    if out.exists():
        shutil.rmtree(out)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    stage_source(source, out)
    bindings_wheel(source.parent.parent, wheels)
    pinned = pins()
    download(pinned, pythons, wheels)
    requirements = [f"llama-cpp-python=={version}", *(f"{n}=={v}" for n, v in pinned.items())]
    (out / "requirements.txt").write_text("\n".join(requirements) + "\n")
    tokenizer = out / "tokenizer"
    tokenizer.mkdir()
    shutil.copy2(synthetic_model.tokenizer_model(), tokenizer)
    keys = {"cpu": gpu_build.key(version, None)}
    prebuilt = {}
    if cuda_arch:
        keys[cuda_arch] = gpu_build.key(version, cuda_arch)
        prebuilt[cuda_arch] = prebuild(source, version, cuda_arch, out, jobs).name
    manifest: dict[str, object] = {
        "llama_cpp_python": version, "pythons": pythons, "requirements": requirements,
        "image_packages": list(IMAGE_PACKAGES), "keys": keys, "prebuilt": prebuilt,
        "bytes": size(out),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--python", action="append", dest="pythons",
                        help=f"a python version to stage wheels for (repeatable; default "
                        f"{IMAGE_PYTHON}, the GPU machine's)")
    parser.add_argument("--cuda-arch", default=None,
                        help="also build the CUDA libraries and llama-server for this compute "
                        "capability (e.g. 90 for the H200) and stage them")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    pythons = args.pythons or [IMAGE_PYTHON]
    manifest = stage(args.out, pythons, args.cuda_arch, args.jobs)
    mib = size(args.out) / 2**20
    print(f"staged {args.out}: {mib:.1f} MiB ({shlex.join(pythons)}; keys {manifest['keys']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
