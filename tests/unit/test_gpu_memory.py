"""bench.gpu_memory: the peak of the device's memory in use, summed over GPUs, from a
stand-in nvidia-smi that prints what the real one prints for its query."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bench.gpu_memory import PeakGpuMemory


def stand_in(folder: Path, gpus: int, samples: list[int]) -> None:
    listing = "".join(f"GPU {i}: NVIDIA H200 (UUID: GPU-{i})\\n" for i in range(gpus))
    stream = "".join(f"{mib}\\n" for mib in samples)
    smi = folder / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = -L ]; then printf "{listing}"; exit 0; fi\n'
        f'printf "{stream}"\n'
        "exec sleep 30\n"  # a stream goes on until it is stopped
    )
    smi.chmod(0o755)


def peak_of(folder: Path, gpus: int, samples: list[int], expected_mib: int,
            monkeypatch: pytest.MonkeyPatch) -> int | None:
    """The peak read while the stand-in streams `samples`, waiting (5 s at most) for it."""
    stand_in(folder, gpus, samples)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    with PeakGpuMemory() as peak:
        deadline = time.monotonic() + 5
        while peak.bytes != expected_mib * 2**20 and time.monotonic() < deadline:
            time.sleep(0.05)
    return peak.bytes


def test_the_peak_over_one_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert peak_of(tmp_path, 1, [512, 4096, 1024], 4096, monkeypatch) == 4096 * 2**20


def test_two_gpus_are_summed_sample_by_sample(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # samples: (1000, 3000) then (2500, 100): the peak is 4000, not 3000 + 2500
    assert peak_of(tmp_path, 2, [1000, 3000, 2500, 100], 4000, monkeypatch) == 4000 * 2**20


def test_without_nvidia_smi_there_is_no_figure(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with PeakGpuMemory() as peak:
        pass
    assert peak.bytes is None
