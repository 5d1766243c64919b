"""tools/llama_build.py: the flags llama.cpp is compiled with, the keyed wheel, the image's build.

The portable profile is configured here for real (CMake on the vendored llama.cpp source, CPU
only, no compile), so the image's CPU variants and where they install are checked without a
Docker daemon.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tools import llama_build

ROOT = Path(__file__).resolve().parents[2]
CLEAN_ENV = ("LLAMA_CMAKE_ARGS", "LLAMA_ALLOW_AMX", "LLAMA_CUDA_ARCHITECTURES", "CFLAGS",
             "CXXFLAGS", "LLAMA_PROFILE")
# The environment this run was started with, read before `plain_environment` clears it: the
# checks of the installed build compare it with the build these flags ask for (`make test
# LLAMA_PROFILE=portable` installs with them, then runs the tests with them).
STARTED_WITH = {name: os.environ[name] for name in CLEAN_ENV if name in os.environ}
x86_only = pytest.mark.skipif(not llama_build._is_x86(), reason="AMX is an x86-64 extension")


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_the_version_built_is_the_one_pyproject_pins() -> None:
    pin = f'"llama-cpp-python=={llama_build.pinned_version()}"'
    assert pin in (ROOT / "pyproject.toml").read_text()


@x86_only
def test_native_builds_for_this_cpu_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    assert llama_build.cmake_args("native") == ["-DGGML_NATIVE=ON"]
    flags = llama_build.compiler_flags("native")
    for name in ("CFLAGS", "CXXFLAGS"):
        assert set(llama_build.AMX_OFF) <= set(flags[name].split())
    monkeypatch.setenv("LLAMA_ALLOW_AMX", "1")
    monkeypatch.setenv("CFLAGS", "-g")
    assert llama_build.compiler_flags("native")["CFLAGS"] == "-g"


def test_portable_loads_cpu_variants_at_run_time() -> None:
    args = llama_build.cmake_args("portable")
    assert {"-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON"} <= set(args)
    if llama_build._is_x86():
        assert "-DGGML_CPU_ALL_VARIANTS=ON" in args
    assert llama_build.compiler_flags("portable") == {"CFLAGS": "", "CXXFLAGS": ""}


def test_cuda_architectures_are_explicit_in_a_portable_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLAMA_CMAKE_ARGS", "-DGGML_CUDA=on")
    args = llama_build.cmake_args("portable")
    assert "-DCMAKE_CUDA_ARCHITECTURES=80;86;89;90" in args
    assert args[-1] == "-DGGML_CUDA=on"  # the user's arguments come last, so they win
    monkeypatch.setenv("LLAMA_CUDA_ARCHITECTURES", "89")
    assert "-DCMAKE_CUDA_ARCHITECTURES=89" in llama_build.cmake_args("portable")
    monkeypatch.setenv("LLAMA_CMAKE_ARGS", "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=75")
    assert [a for a in llama_build.cmake_args("portable") if "CUDA_ARCH" in a] == [
        "-DCMAKE_CUDA_ARCHITECTURES=75"
    ]


def test_other_flags_are_another_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    base = llama_build.describe("native").key
    assert llama_build.describe("native").key == base
    assert llama_build.describe("portable").key != base
    monkeypatch.setenv("LLAMA_CMAKE_ARGS", "-DGGML_BLAS=ON")
    assert llama_build.describe("native").key != base
    monkeypatch.delenv("LLAMA_CMAKE_ARGS")
    monkeypatch.setenv("CFLAGS", "-O2")
    assert llama_build.describe("native").key != base
    monkeypatch.delenv("CFLAGS")
    monkeypatch.setenv("LLAMA_ALLOW_AMX", "1")
    assert llama_build.describe("native").key != base


def test_a_native_wheel_is_keyed_by_this_cpu_and_a_portable_one_is_not() -> None:
    assert llama_build.describe("native").cpu_flags
    assert llama_build.describe("portable").cpu_flags == ""


def test_the_running_bindings_are_the_build_their_flags_ask_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No stale build: what this environment runs was installed by the tool, with the key that
    the flags of this run (CFLAGS, LLAMA_CMAKE_ARGS...) ask for, as `make test` passes them."""
    record = llama_build.installed(sys.executable)
    assert record is not None, "llama-cpp-python was not installed by tools/llama_build.py"
    profile = str(record["profile"])
    if "LLAMA_PROFILE" in STARTED_WITH:
        assert profile == STARTED_WITH["LLAMA_PROFILE"], "installed for another profile"
    for name, value in STARTED_WITH.items():
        monkeypatch.setenv(name, value)
    assert record["key"] == llama_build.describe(profile).key
    assert Path(str(record["wheel"])).parent.parent == llama_build.wheel_cache()


@x86_only
def test_the_running_bindings_have_no_amx_kernels() -> None:
    pytest.importorskip("llama_cpp")
    from genstruct_service.engine.backend.build_info import load_backends, read_build_info

    if STARTED_WITH.get("LLAMA_ALLOW_AMX", "") not in ("", "0"):
        pytest.skip("AMX allowed by LLAMA_ALLOW_AMX")
    load_backends()
    build = read_build_info()
    assert not build.has_amx, build.system_info
    assert "AVX2" in build.cpu_features or "AVX2" not in build.system_info


def test_the_service_reads_the_record_where_the_tool_writes_it() -> None:
    pytest.importorskip("llama_cpp")
    from genstruct_service.engine.backend import build_info

    assert build_info.BUILD_RECORD == llama_build.BUILD_INFO


@pytest.mark.skipif(not llama_build._is_x86(), reason="the variants listed are x86-64's")
def test_portable_configure_installs_every_cpu_variant_beside_the_bindings(
    tmp_path: Path,
) -> None:
    """The image's flags run for real: CMake configures the CPU-only portable build."""
    version = llama_build.pinned_version()
    sdist = llama_build.vendored_source(version, llama_build.sdist_cache()).parent.parent
    build_dir = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(sdist), "-B", str(build_dir), *llama_build.cmake_args("portable"),
         f"-DSKBUILD_PLATLIB_DIR={tmp_path / 'platlib'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    script = (build_dir / "vendor" / "llama.cpp" / "ggml" / "src" / "cmake_install.cmake")
    installs = [line for line in script.read_text().splitlines() if "file(INSTALL" in line]
    for variant in ("x64", "haswell", "skylakex", "icelake", "zen4", *llama_build.AMX_VARIANTS):
        lines = [line for line in installs if f"libggml-cpu-{variant}." in line]
        assert lines, f"no CPU variant {variant} in the portable build"
        destination = 'DESTINATION "${CMAKE_INSTALL_PREFIX}/llama_cpp/lib"'
        assert all(destination in line for line in lines), lines


def dockerfile_build_stage_env() -> dict[str, str]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    env: dict[str, str] = {}
    stage = None
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            stage = instruction["value"].split()[-1]
        elif instruction["instruction"] == "ENV" and stage == "build":
            for pair in shlex.split(instruction["value"]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def dockerfile_args() -> dict[str, str]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    args = {}
    for instruction in parser.structure:
        if instruction["instruction"] == "ARG":
            key, _, value = instruction["value"].partition("=")
            args[key] = shlex.split(value)[0] if value else ""
    return args


def test_the_image_builds_the_portable_profile_with_explicit_cuda_architectures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = dockerfile_build_stage_env()
    args = dockerfile_args()
    assert env["LLAMA_PROFILE"] == "portable"
    assert env["LLAMA_CMAKE_ARGS"] == "${LLAMA_CMAKE_ARGS}"
    assert env["LLAMA_CUDA_ARCHITECTURES"] == "${CUDA_ARCHITECTURES}"
    assert "CUDA_ARCHITECTURES" in args  # a build argument
    assert "GGML_NATIVE" not in (ROOT / "Dockerfile").read_text()  # the tool decides
    # What the tool makes of the image's defaults: portable CPU code, CUDA for named GPUs.
    monkeypatch.setenv("LLAMA_CMAKE_ARGS", args["LLAMA_CMAKE_ARGS"])
    monkeypatch.setenv("LLAMA_CUDA_ARCHITECTURES", args["CUDA_ARCHITECTURES"])
    cmake = llama_build.cmake_args(env["LLAMA_PROFILE"])
    assert {"-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CUDA=on"} <= set(cmake)
    archs = next(a for a in cmake if a.startswith("-DCMAKE_CUDA_ARCHITECTURES="))
    assert {"80", "86", "89", "90"} <= set(archs.split("=", 1)[1].split(";"))
    assert "native" not in archs
