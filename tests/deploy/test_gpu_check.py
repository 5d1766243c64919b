"""bench/gpu_check.sh: its CPU form runs for real; its GPU form refuses a machine without
nvidia-smi before installing anything, and builds the command line the GPU check needs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
# The environment of the venv running the tests: it has the project, so nothing is installed.
VENV = Path(sys.executable).parent.parent


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any GPU_CHECK_* or WHEELS_DIR, plus `settings`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GPU_CHECK_") and k != "WHEELS_DIR"}
    return {**env, **settings}


def run(env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_the_script_parses_and_is_executable() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)


def test_gpu_form_without_nvidia_smi_fails_before_installing_anything(tmp_path: Path) -> None:
    venv, out = tmp_path / "venv", tmp_path / "out"
    env = clean_env(GPU_CHECK_NVIDIA_SMI="/nonexistent", GPU_CHECK_VENV=str(venv),
                    GPU_CHECK_OUT=str(out))
    done = run(env, timeout=60)
    assert done.returncode != 0
    assert "nvidia-smi" in done.stderr
    assert not venv.exists() and not out.exists()


def test_gpu_form_builds_for_the_detected_architecture_only(tmp_path: Path) -> None:
    """A dry run against a stand-in nvidia-smi: the CUDA flags and the benchmark's command."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  -L) echo "GPU 0: NVIDIA L4 (UUID: GPU-0)";;\n'
        "  --query-gpu=compute_cap) echo 8.9;;\n"
        '  --query-gpu=*) echo "NVIDIA L4, 550.54.15, 23034 MiB, 8.9";;\n'
        "esac\n"
    )
    smi.chmod(0o755)
    venv, out = tmp_path / "venv", tmp_path / "out"
    # A dry run only warns when nvcc is missing, so no CUDA toolkit is needed here.
    env = clean_env(GPU_CHECK_DRY_RUN="1", GPU_CHECK_NVIDIA_SMI=str(smi),
                    GPU_CHECK_VENV=str(venv), GPU_CHECK_OUT=str(out))
    done = run(env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LLAMA_CMAKE_ARGS=-DGGML_CUDA=on LLAMA_CUDA_ARCHITECTURES=89;" in done.stdout
    (command,) = [line.split("benchmark: ", 1)[1] for line in done.stdout.splitlines()
                  if "benchmark: " in line]
    for flags in ("--model synthetic ", "--systems engine,loop,server ", "--n-gpu-layers -1 ",
                  "--n-batch 2048 ", "--n-ubatch 512 ", "--flash-attn on ",
                  "--scenarios c1n1,c8n1,c32n1 ", "--repeat 3 ",
                  f"--out {out / 'throughput.json'}"):
        assert flags in command
    assert re.search(r"--threads \d+ ", command)
    assert "--docs" not in command and "--max-tokens" not in command
    assert "--n-ctx" not in command  # the benchmark sizes the KV cache per scenario
    assert not venv.exists() and not out.exists()


@pytest.mark.model
@pytest.mark.timeout(600)
def test_cpu_form_runs_the_benchmark_and_describes_the_machine(tmp_path: Path) -> None:
    env = clean_env(
        GPU_CHECK_CPU="1", GPU_CHECK_VENV=str(VENV), GPU_CHECK_MODEL="synthetic:tiny",
        GPU_CHECK_SCENARIOS="c1n1", GPU_CHECK_REPEAT="1", GPU_CHECK_MAX_TOKENS="8",
        GPU_CHECK_DOCS="2", GPU_CHECK_SYSTEMS="engine,loop", GPU_CHECK_OUT=str(tmp_path),
    )
    done = run(env, timeout=580)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "step 2 skipped" in done.stdout  # no llama-server without `server` in the systems

    records = json.loads((tmp_path / "throughput.json").read_text())
    engine = [r for r in records if r["system"] == "engine"]
    assert engine and all(r["tokens_per_second"] > 0 for r in engine)
    assert all((r["concurrency"], r["num_generations"]) == (1, 1) for r in records)

    machine = json.loads((tmp_path / "machine.json").read_text())
    assert machine["mode"] == "cpu" and machine["gpus"] == []
    assert machine["nproc"] >= 1
    assert "llama-cpp-python" in machine["build_report"]
    build = machine["llama_build"]  # tools/llama_build.py's record of the installed build
    assert build is not None and build["key"] in machine["build_report"]
    assert machine["model"] == "synthetic:tiny" and machine["model_bytes"] > 0
    assert (tmp_path / "gpu_check.log").is_file()
    assert set(json.loads((tmp_path / "timings.json").read_text())["steps_seconds"]) == {
        "1", "3", "4", "4b"}
    cost = (tmp_path / "verify_cost.txt").read_text().splitlines()
    rows = [line.split() for line in cost if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 4, 8, 16]  # draft lengths, each timed
    assert all(float(r[2]) > 0 for r in rows)
