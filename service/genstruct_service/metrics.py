"""Prometheus metrics of the service, on their own registry and their own HTTP port."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine.types import EngineStats

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class _EngineCollector(Collector):
    """Reads the engine's queue depth and busy slots at scrape time, so they are never stale."""

    def __init__(self) -> None:
        self.stats: Callable[[], EngineStats] | None = None

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily(
            "genstruct_queue_depth", "Documents waiting for a free engine slot."
        )
        busy = GaugeMetricFamily("genstruct_busy_slots", "Engine slots generating now.")
        slots = GaugeMetricFamily("genstruct_slots", "Engine slots (n_parallel).")
        if self.stats is not None:
            stats = self.stats()
            queued.add_metric([], stats.queued)
            busy.add_metric([], stats.busy_slots)
            slots.add_metric([], stats.n_parallel)
        yield from (queued, busy, slots)


class Metrics:
    """Every metric of one server; `on_step` is the engine's per-decode callback."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "genstruct_requests",
            "Finished RPCs by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.batch_items = Counter(
            "genstruct_batch_items",
            "GenerateBatch documents by outcome (OK or the per-item error code).",
            ["code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "genstruct_prompt_tokens", "Prompt tokens processed.", registry=r
        )
        self.generated_tokens = Counter(
            "genstruct_generated_tokens", "Tokens generated.", registry=r
        )
        self.spec_drafted_tokens = Counter(
            "genstruct_spec_drafted_tokens",
            "Tokens drafted by speculation and verified by the model.",
            registry=r,
        )
        self.spec_accepted_tokens = Counter(
            "genstruct_spec_accepted_tokens",
            "Drafted tokens the model agreed with (each saved a decode step).",
            registry=r,
        )
        self.parse_failures = Counter(
            "genstruct_parse_failures",
            "Generations whose completion did not parse into a pair.",
            registry=r,
        )
        self.truncations = Counter(
            "genstruct_truncations", "Documents whose content was cut to fit.", registry=r
        )
        self.decode_batch_tokens = Histogram(
            "genstruct_decode_batch_tokens",
            "Tokens in one engine decode step (prompt chunks plus one per generating slot).",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "genstruct_time_to_first_token_seconds",
            "Seconds from receiving a document to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "genstruct_request_duration_seconds",
            "Seconds an RPC took, by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._engine = _EngineCollector()
        r.register(self._engine)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def watch_engine(self, stats: Callable[[], EngineStats] | None) -> None:
        """Read queue depth and busy slots from `stats` at every scrape (None: not loaded)."""
        self._engine.stats = stats

    def on_step(self, batch_tokens: int) -> None:
        """The engine calls this after each decode (from its own thread; metrics are locked)."""
        self.decode_batch_tokens.observe(batch_tokens)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on host:port in a daemon thread; returns the bound port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop serving /metrics; the HTTP thread finishes on its own within half a second."""
        http, self._http, self._thread = self._http, None, None
        if http is not None:

            def shut() -> None:
                http.shutdown()  # waits for serve_forever's next poll (0.5 s)
                http.server_close()

            threading.Thread(target=shut, name="metrics-shutdown", daemon=True).start()
