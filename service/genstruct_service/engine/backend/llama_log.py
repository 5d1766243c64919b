"""llama.cpp's log lines, read while a call runs: what llama.cpp decided and says nowhere else.

Creating a context with flash attention "auto" resolves it per device and only logs the
outcome (`Flash Attention enabled`, or `... not supported, set to disabled`); no function
returns it. `captured` puts a callback in front of the one llama-cpp-python installed, for
the length of a `with` block, and hands every line on to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

import llama_cpp as ll
from llama_cpp import _logger

# llama.cpp has one log callback per process: one capture at a time.
_LOCK = threading.Lock()


@contextlib.contextmanager
def captured() -> Iterator[list[str]]:
    """The lines llama.cpp logs inside the block (every thread's), as they come."""
    lines: list[str] = []
    forward = _logger.llama_log_callback

    @ll.llama_log_callback  # type: ignore[untyped-decorator]
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))
        forward(level, text, user_data)

    with _LOCK:
        ll.llama_log_set(capture, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            ll.llama_log_set(forward, ctypes.c_void_p(0))


def flash_attn_in_force(setting: str, lines: list[str]) -> str:
    """"on" or "off" as llama.cpp resolved `setting` ("auto", "on", "off"), read from the
    lines it logged creating the context; `setting` itself when they do not say."""
    if setting != "auto":
        return setting
    for line in lines:
        if "Flash Attention" in line:
            return "off" if "not supported" in line or "disabled" in line else "on"
    return setting
