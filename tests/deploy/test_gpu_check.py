"""bench/gpu_check.sh and its stage: the plan it makes for a GPU it is shown, what it may
write and build, and its CPU form run for real, offline, from a real stage, under a python
that has only what the GPU machine's image has."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import gpu_build, gpu_stage
from tools import llama_build

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
VERSION = llama_build.pinned_version()


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without GPU_CHECK_* or OUT, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    return {**env, **settings}


def run(env: dict[str, str], timeout: float, *, offline: bool = False
        ) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(SCRIPT)]
    if offline:
        # A network namespace of its own: no route out, loopback only (llama-server's port).
        command = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                   *command]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    done = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"],
                          capture_output=True, check=False)
    return done.returncode == 0


def stand_in_nvidia_smi(folder: Path, cap: str = "8.9") -> Path:
    smi = folder / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  -L) echo "GPU 0: NVIDIA L4 (UUID: GPU-0)";;\n'
        f"  --query-gpu=compute_cap) echo {cap};;\n"
        f'  --query-gpu=*) echo "NVIDIA L4, 550.54.15, 23034 MiB, {cap}";;\n'
        "esac\n"
    )
    smi.chmod(0o755)
    return smi


def empty_stage(folder: Path) -> Path:
    """The files the script's preflight looks for, with nothing in them."""
    (folder / "wheels").mkdir(parents=True)
    (folder / "llama.cpp.tar.xz").write_bytes(b"")
    (folder / "requirements.txt").write_text(f"llama-cpp-python=={VERSION}\n")
    return folder


# ---------------------------------------------------------------- the script, read


def script() -> str:
    return SCRIPT.read_text()


def test_the_script_parses_and_is_executable() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)


def test_every_measurement_goes_through_the_time_guard() -> None:
    text = script()
    lines = text.splitlines()
    measured = [i for i, line in enumerate(lines)
                if re.search(r'"\$PY" -m bench\.(?!gpu_build|synthetic_model)', line)]
    assert len(measured) >= 4  # throughput, step profile, speculation, verify cost
    for i in measured:
        # run by `guarded`, directly or from a function that `guarded` calls
        function = next((m.group(1) for line in reversed(lines[: i + 1])
                         if (m := re.match(r"^(\w+)\(\) \{", line))), None)
        assert "guarded" in lines[i] or (
            function is not None and re.search(rf"^\s*(for .*; do )?guarded \S+ \d+ {function}\b",
                                               text, re.M)
        ), lines[i]
    # the guard compares the step's estimate with the time left, and says why it skips
    guard = text[text.index("guarded() {"):]
    guard = guard[: guard.index("\n}\n")]
    assert "BUDGET" in guard and "skipped" in guard


def test_at_most_eight_files_come_back() -> None:
    text = script()
    written = set(re.findall(r'\$RESULTS/([\w.-]+)', text))
    assert written and len(written) <= 8, written
    assert "wc -l) <= 8" in text  # and it checks the folder itself at the end


def test_one_build_of_llama_cpp() -> None:
    text = script()
    assert len(re.findall(r"-m bench\.gpu_build build\b", text)) == 1
    for second_build in ("pip wheel", "llama_build.py", "bench.llama_server build",
                         "cmake --build", "python -m venv", "-m venv"):
        assert second_build not in text


def test_the_stage_leaves_out_the_other_backends_and_the_models() -> None:
    def kept(name: str) -> bool:
        return gpu_stage._trim(tarfile.TarInfo(name)) is not None

    assert kept("llama.cpp/ggml/src/ggml-cuda/fattn.cu")
    assert kept("llama.cpp/ggml/src/ggml-cpu/ops.cpp")
    assert kept("llama.cpp/ggml/src/ggml-backend.cpp")  # a file of ggml itself
    assert kept("llama.cpp/tools/server/server.cpp")
    assert not kept("llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp")
    assert not kept("llama.cpp/models/ggml-vocab-llama-spm.gguf")
    assert not kept("llama.cpp/docs/build.md")


def test_a_build_key_names_its_flags() -> None:
    keys = {gpu_build.key(VERSION, arch) for arch in (None, "89", "90")}
    assert len(keys) == 3
    assert gpu_build.key(VERSION, "90") != gpu_build.key("0.0.1", "90")
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in gpu_build.cmake_args("90")
    assert not any("CUDA" in arg for arg in gpu_build.cmake_args(None))


# ---------------------------------------------------------------- the plan for a GPU


def test_gpu_form_without_nvidia_smi_fails_before_anything(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    env = clean_env(GPU_CHECK_NVIDIA_SMI="/nonexistent", GPU_CHECK_WORK=str(work),
                    GPU_CHECK_OUT=str(out), GPU_CHECK_STAGE=str(empty_stage(tmp_path / "s")))
    done = run(env, timeout=60)
    assert done.returncode != 0
    assert "nvidia-smi not found" in done.stderr
    assert not work.exists() and not out.exists()


def test_without_a_stage_it_says_how_to_make_one(tmp_path: Path) -> None:
    env = clean_env(GPU_CHECK_CPU="1", GPU_CHECK_STAGE=str(tmp_path / "none"),
                    GPU_CHECK_OUT=str(tmp_path / "out"))
    done = run(env, timeout=60)
    assert done.returncode != 0
    assert "make gpu-stage" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prebuilt", [False, True])
def test_gpu_form_builds_for_the_detected_architecture_only(tmp_path: Path,
                                                            prebuilt: bool) -> None:
    stage = empty_stage(tmp_path / "stage")
    key = gpu_build.key(VERSION, "89")
    if prebuilt:
        (stage / f"llama-{key}.tar.xz").write_bytes(b"")
    env = clean_env(GPU_CHECK_DRY_RUN="1", GPU_CHECK_STAGE=str(stage),
                    GPU_CHECK_NVIDIA_SMI=str(stand_in_nvidia_smi(tmp_path)),
                    GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_OUT=str(tmp_path / "out"))
    done = run(env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"build {key} (CUDA architecture 89 only, " in done.stdout
    assert ("staged prebuilt" if prebuilt else "compiled here") in done.stdout
    assert "--n-gpu-layers -1 " in done.stdout and "--flash-attn on" in done.stdout
    assert "budget 480s; levels 1,8,32,64" in done.stdout
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the rehearsal


@pytest.fixture(scope="session")
def stage() -> Path:
    """A real stage (the registries are reachable here), as `make gpu-stage` makes it."""
    out = ROOT / "bench" / ".build" / "gpu-stage-rehearsal"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([sys.executable, "-m", "bench.gpu_stage", "--out", str(out),
                    "--python", gpu_stage.IMAGE_PYTHON, "--python", here], cwd=ROOT,
                   check=True, timeout=900)
    return out


@pytest.fixture(scope="session")
def image_python() -> Path:
    """A python with the GPU machine image's packages that the check relies on, and no more."""
    venv = ROOT / "bench" / ".build" / "image-python"
    python = venv / "bin" / "python"
    stamp = venv / "packages.txt"
    wanted = "\n".join(gpu_stage.IMAGE_PACKAGES)
    if not (python.exists() and stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        *gpu_stage.IMAGE_PACKAGES], check=True, timeout=600)
        stamp.write_text(wanted)
    return python


def rehearsal_env(stage: Path, python: Path, tmp: Path, **more: str) -> dict[str, str]:
    env = clean_env(
        GPU_CHECK_CPU="1", GPU_CHECK_STAGE=str(stage), GPU_CHECK_PYTHON=str(python),
        GPU_CHECK_MODEL="synthetic:tiny", GPU_CHECK_LEVELS="1,2", GPU_CHECK_MAX_TOKENS="8",
        GPU_CHECK_PROFILE_LEVELS="1,2", GPU_CHECK_ROUNDS="2", GPU_CHECK_WORK=str(tmp / "work"),
        GPU_CHECK_OUT=str(tmp / "out"), **more,
    )
    # nothing of the project's environment leaks in
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    return env


@pytest.mark.model
@pytest.mark.timeout(2400)
def test_rehearsal_cpu_form_offline_from_the_stage(stage: Path, image_python: Path,
                                                  tmp_path: Path) -> None:
    env = rehearsal_env(stage, image_python, tmp_path)
    done = run(env, timeout=2300, offline=can_unshare())
    output = done.stdout[-6000:] + done.stderr[-4000:]
    assert done.returncode == 0, output

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "machine.json",
                                                     "results.json"]
    results = json.loads((out / "results.json").read_text())
    measured = [f"{system}-c{level}{suffix}" for suffix in ("", "-r2")
                for system in ("engine", "server") for level in (1, 2)]
    assert {name: step["status"] for name, step in results["steps"].items()} == {
        name: "done" for name in ("build", *measured, "step-profile-c1", "step-profile-c2",
                                  "speculation", "verify-cost")}
    runs = sorted((r["system"], r["concurrency"]) for r in results["throughput"])
    assert runs == sorted(2 * [(s, c) for s in ("engine", "llama-server") for c in (1, 2)])
    assert all(r["tokens_per_second"] > 0 and r["peak_gpu_memory_bytes"] is None
               for r in results["throughput"])
    assert [p["in_flight"] for p in results["step_profile"]] == [1, 2]
    assert all(p["steps"] > 0 and p["decode_ms_per_step"] > 0 for p in results["step_profile"])
    modes = {run["system"] for run in results["speculation"]["runs"]}
    assert modes == {"engine:off", "engine:always"}
    assert any(line.split()[:1] == ["16"] for line in results["verify_cost"])
    # the same curve as seconds by batch rows, for bench.draft_replay --price-with
    costs = results["verify_cost_seconds"]
    assert {"1", "2", "4", "17"} <= set(costs) and all(s > 0 for s in costs.values())

    machine = json.loads((out / "machine.json").read_text())
    assert machine["mode"] == "cpu" and machine["gpus"] == []
    assert machine["build"]["key"] == gpu_build.key(VERSION, None)
    assert machine["built_from"] in ("source", "cache")
    # the build report names that build, read from the record beside its libraries
    assert machine["build"]["key"] in machine["build_report"]
    assert machine["stage"]["requirements"][0] == f"llama-cpp-python=={VERSION}"


@pytest.mark.model
@pytest.mark.timeout(2400)
def test_rehearsal_past_its_budget_skips_every_measurement(stage: Path, image_python: Path,
                                                          tmp_path: Path) -> None:
    env = rehearsal_env(stage, image_python, tmp_path, GPU_CHECK_BUDGET_S="0")
    done = run(env, timeout=2300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    steps = results["steps"]
    assert steps.pop("build")["status"] == "done"
    assert steps and all(step["status"] == "skipped" for step in steps.values())
    assert results["throughput"] == [] and results["step_profile"] == []
    assert "engine-c1 skipped: it would end past the budget" in done.stdout
