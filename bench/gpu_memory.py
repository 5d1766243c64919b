"""The GPU memory a benchmark's peer takes at its peak, sampled from nvidia-smi.

One `nvidia-smi -lms` process streams the memory in use on every GPU while the peer runs;
the peak of their sum is kept. The whole device's use is what is read, not the process's
(containers often hide the process list), so nothing else may run on the GPU meanwhile: the
benchmarks run their peers one after another.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from types import TracebackType

INTERVAL_MS = 200


class PeakGpuMemory:
    """`with PeakGpuMemory() as peak: ...`, then `peak.bytes` (None without nvidia-smi)."""

    def __init__(self) -> None:
        self.bytes: int | None = None
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> PeakGpuMemory:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return self
        self._process = subprocess.Popen(
            [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits",
             "-lms", str(INTERVAL_MS)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        gpus = subprocess.run([smi, "-L"], capture_output=True, text=True,
                              check=False).stdout.count("GPU ")
        self._reader = threading.Thread(target=self._read, args=(max(gpus, 1),), daemon=True)
        self._reader.start()
        return self

    def _read(self, gpus: int) -> None:
        """One line per GPU per sample, in GPU order."""
        assert self._process is not None and self._process.stdout is not None
        sample: list[int] = []
        for line in self._process.stdout:
            if not line.strip().isdigit():
                continue
            sample.append(int(line) * 2**20)  # MiB
            if len(sample) == gpus:
                self.bytes = max(self.bytes or 0, sum(sample))
                sample = []

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
