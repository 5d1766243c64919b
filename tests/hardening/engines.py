"""The fake engine for memory measurements: tests.fakes' engine without its request history.

`tests.fakes.FakeEngine` keeps every request it saw (for assertions), which is a leak by
design; a server measured for memory growth must not hold what the test sends. Pick it with
GENSTRUCT_ENGINE_FACTORY=tests.hardening.engines:make_engine.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from tests.fakes import FakeEngine


def make_engine(settings: Any, *, on_step: Callable[[int], None] | None = None) -> FakeEngine:
    engine = FakeEngine(
        n_parallel=settings.n_parallel,
        max_queue=settings.max_queue,
        token_delay=float(os.environ.get("FAKE_ENGINE_TOKEN_DELAY", "0")),
        on_step=on_step,
    )
    # Only append() is used on these: a short deque keeps the last few and nothing else.
    engine.requests = deque(maxlen=4)  # type: ignore[assignment]
    engine.finished = deque(maxlen=4)  # type: ignore[assignment]
    engine.cancelled = deque(maxlen=4)  # type: ignore[assignment]
    return engine


def make_slow_engine(
    settings: Any, *, on_step: Callable[[int], None] | None = None
) -> FakeEngine:
    """`make_engine` after FAKE_ENGINE_LOAD_SECONDS, like a model that takes a while to load
    (the server listens meanwhile: health NOT_SERVING, calls UNAVAILABLE)."""
    time.sleep(float(os.environ.get("FAKE_ENGINE_LOAD_SECONDS", "5")))
    return make_engine(settings, on_step=on_step)
