"""Processes for client tests: fake-engine servers and `genstruct` runs, with bounded waits."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    PYTHONUNBUFFERED="1",
)
ENV.pop("GENSTRUCT_TARGET", None)
ENV.pop("GENSTRUCT_TOKEN", None)
_PROGRESS = re.compile(r"genstruct: (\d+)/(\d+) documents")


# The lines of each pipe read so far, by a thread of its own. A thread, because select() on
# the pipe cannot see lines already in the text stream's buffer, and readline() after it
# blocks until a whole line arrives: either way a wait with no bound.
_LINES: weakref.WeakKeyDictionary[IO[str], queue.Queue[str | None]] = (
    weakref.WeakKeyDictionary()
)


def _lines(stream: IO[str]) -> queue.Queue[str | None]:
    """The queue of `stream`'s lines (None at EOF), starting its reader on the first call."""
    lines = _LINES.get(stream)
    if lines is None:
        lines = _LINES[stream] = queue.Queue()
        threading.Thread(target=_read_all, args=(stream, lines), daemon=True).start()
    return lines


def _read_all(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    try:
        for line in stream:
            lines.put(line)
    except (OSError, ValueError):  # closed under the thread
        pass
    finally:
        lines.put(None)


def read_line(stream: IO[str], timeout: float) -> str:
    """The next line of a child's pipe; fails after `timeout` seconds or at EOF.

    From the first call on, a thread keeps reading the pipe, so the child never blocks on
    a full pipe; read the rest with `read_rest`, not from the stream.
    """
    lines = _lines(stream)
    try:
        line = lines.get(timeout=max(0.0, timeout))
    except queue.Empty:
        raise AssertionError(f"no output within {timeout}s") from None
    if line is None:
        lines.put(None)  # EOF stays EOF for the next caller
        raise AssertionError("the process closed its output")
    return line


def read_rest(stream: IO[str], timeout: float) -> str:
    """Everything `stream` still has up to EOF; fails after `timeout` seconds."""
    lines = _lines(stream)
    deadline = time.monotonic() + timeout
    rest: list[str] = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no EOF within {timeout}s") from None
        if line is None:
            lines.put(None)
            return "".join(rest)
        rest.append(line)


class ServerProcess:
    """`tests.client.fake_server` in a subprocess; restartable on the same port."""

    def __init__(self, *flags: str) -> None:
        self.flags = list(flags)
        self.port = 0
        self.process: subprocess.Popen[str] | None = None
        self.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.client.fake_server", "--port", str(self.port),
             *self.flags],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert self.process.stdout is not None
        self.port = int(json.loads(read_line(self.process.stdout, 60))["port"])

    def kill(self) -> None:
        """SIGKILL: no drain, connections reset."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self) -> None:
        """SIGTERM: the server drains, then exits."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)

    def restart(self) -> None:
        self.start()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def genstruct(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Runs the `genstruct` command to its end."""
    return subprocess.run(
        [sys.executable, "-m", "genstruct_client.cli", *args],
        cwd=ROOT, env=kwargs.pop("env", ENV), capture_output=True, text=True,
        timeout=kwargs.pop("timeout", 300), **kwargs,
    )


def start_genstruct(*args: str) -> subprocess.Popen[str]:
    """Starts `genstruct` with a progress line per document on stderr (see wait_progress)."""
    return subprocess.Popen(
        [sys.executable, "-m", "genstruct_client.cli", *args, "--progress-interval", "0"],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def wait_progress(process: subprocess.Popen[str], at_least: int, timeout: float = 120) -> int:
    """Reads progress lines until `at_least` documents are done; returns the count seen."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    while True:
        line = read_line(process.stderr, max(0.1, deadline - time.monotonic()))
        match = _PROGRESS.search(line)
        if match and int(match.group(1)) >= at_least:
            return int(match.group(1))


def finish(process: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    """Waits for the end, draining stderr; returns (exit code, the rest of stderr)."""
    assert process.stderr is not None
    # stderr's reader thread (read_line's) drains it while this waits: no communicate(),
    # which would read the same pipe from a second thread
    _lines(process.stderr)
    process.wait(timeout)
    return process.returncode, read_rest(process.stderr, timeout)


def write_documents(path: Path, count: int, prefix: str = "doc") -> list[dict[str, str]]:
    records = [
        {"title": f"{prefix} {i}", "content": f"Paragraph number {i} about {prefix} things."}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def output_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_table(path).to_pylist())
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_exactly_once(records: list[dict[str, Any]], ids: set[str], generations: int = 1) -> None:
    """Every (id, generation) of `ids` once, and nothing else."""
    counts = Counter((r["id"], r["generation_index"]) for r in records)
    repeated = {key: n for key, n in counts.items() if n > 1}
    assert not repeated, f"written more than once: {list(repeated)[:5]}"
    expected = {(doc_id, g) for doc_id in ids for g in range(generations)}
    assert set(counts) == expected, (
        f"missing {len(expected - set(counts))}, unexpected {len(set(counts) - expected)}"
    )
