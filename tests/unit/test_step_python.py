"""bench.step_python drives the real scheduler, runner and update without a model: it must
keep up with their interfaces, and every sequence must decode at every step it times."""

from __future__ import annotations

import json

import llama_cpp
import pytest

from bench import step_python


def test_it_times_every_level_and_gives_back_llama_decode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    decode = llama_cpp.llama_decode
    assert step_python.main(["--in-flight", "1,3", "--steps", "30"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["in_flight"] for line in lines] == [1, 3]
    assert all(line["hot_us_per_step"] > 0 and line["cold_us_per_step"] > 0 for line in lines)
    assert llama_cpp.llama_decode is decode
