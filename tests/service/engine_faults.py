"""Fault injection for `genstruct-server` in a subprocess: the real engine, whose thread dies.

Pick it with GENSTRUCT_ENGINE_FACTORY=tests.service.engine_faults:make_failing_engine.
`make_failing_engine` builds the real LlamaEngine exactly as the server does
(`cli.load_engine`), then, once the first request has completed, makes every llama.cpp decode
raise, as a crashing backend would: the exception leaves the engine's step loop and kills its
thread for real. It is a test-only monkeypatch of `llama_cpp.llama_decode` (and of this one
engine's `generate`, to arm it), inside the subprocess; nothing in the engine knows of it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from genstruct_service.engine.types import Completed, Engine, EngineEvent, GenerationRequest

FAULT = "llama_decode crashed (injected fault)"


def make_failing_engine(settings: Any, *, on_step: Callable[[int], None]) -> Engine:
    """The real engine of `settings`, whose decodes raise after its first completed request."""
    import llama_cpp
    from genstruct_service import cli

    armed = threading.Event()  # set on the asyncio side, read on the engine thread
    real_decode = llama_cpp.llama_decode

    def decode(ctx: Any, batch: Any) -> int:
        if armed.is_set():
            raise RuntimeError(FAULT)
        result: int = real_decode(ctx, batch)
        return result

    llama_cpp.llama_decode = decode
    # load_engine would call this very factory again while the hook is set
    hook = os.environ.pop(cli.ENGINE_FACTORY_ENV, None)
    try:
        engine = cli.load_engine(settings, on_step)
    finally:
        if hook is not None:
            os.environ[cli.ENGINE_FACTORY_ENV] = hook
    real_generate = engine.generate

    async def generate(request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        async with aclosing(real_generate(request)) as events:  # type: ignore[type-var]
            async for event in events:
                if isinstance(event, Completed):
                    armed.set()  # before the yield: the caller closes us once it has this
                yield event

    engine.generate = generate  # type: ignore[method-assign]
    return engine
