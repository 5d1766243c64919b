"""The helpers' waits are bounded, whatever the child writes and however its pipe buffers."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.client.helpers import read_line, read_rest

# Two lines in one write (both land in the text stream's buffer at once), then a line with
# no end, then silence.
CHILD = "import sys, time; sys.stdout.write('a\\nb\\nc'); sys.stdout.flush(); time.sleep(60)"


def test_read_line_sees_buffered_lines_and_times_out_on_a_partial_one() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    try:
        assert read_line(child.stdout, 10) == "a\n"
        started = time.monotonic()
        assert read_line(child.stdout, 10) == "b\n"  # already buffered: no wait for more
        assert time.monotonic() - started < 5
        started = time.monotonic()
        with pytest.raises(AssertionError, match="no output within"):
            read_line(child.stdout, 0.5)  # "c" has no newline yet
        assert time.monotonic() - started < 5
        child.kill()
        assert read_rest(child.stdout, 10) == "c"
        with pytest.raises(AssertionError, match="closed its output"):
            read_line(child.stdout, 10)
    finally:
        child.kill()
        child.wait(30)
