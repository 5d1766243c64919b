"""Every invalid combination of engine settings, given as flags, ends in one line per error
and exit code 2, never a traceback; every valid one is accepted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from genstruct_service.cli import main
from genstruct_service.config import C_INT_MAX, settings_from_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SERVER = Path(sys.executable).with_name("genstruct-server")
PREFIX = "genstruct-server: "

# (flag value, the value pydantic sees or None when the field must refuse it)
_Value = tuple[str, Any]


def _ints(low: int, high: int) -> st.SearchStrategy[_Value]:
    """Integers around the field's range [low, high], and text that is no integer."""
    near = st.one_of(
        st.integers(low - 3, low + 3),
        st.integers(low, min(high, low + 70_000)),
        st.sampled_from([high, high + 1, 2**32, -(2**31)]),
    )
    good = near.map(lambda n: (str(n), n if low <= n <= high else None))
    return st.one_of(good, st.sampled_from([("abc", None), ("1.5", None), ("", None)]))


def _choice(allowed: list[str]) -> st.SearchStrategy[_Value]:
    bad = st.sampled_from(["yes", "Q8_0", "q5_1", ""]).map(lambda v: (v, None))
    return st.one_of(st.sampled_from(allowed).map(lambda v: (v, v)), bad)


CACHE_TYPES = ["f16", "q8_0", "q4_0"]
FIELDS: dict[str, st.SearchStrategy[_Value]] = {
    "n_parallel": _ints(1, 256),
    "n_ctx": _ints(256, C_INT_MAX),
    "n_batch": _ints(1, C_INT_MAX),
    "n_ubatch": _ints(1, C_INT_MAX),
    "n_gpu_layers": _ints(-1, C_INT_MAX),
    "threads": _ints(1, C_INT_MAX),
    "flash_attn": _choice(["auto", "on", "off"]),
    "cache_type_k": _choice(CACHE_TYPES),
    "cache_type_v": _choice(CACHE_TYPES),
    "speculation": _choice(["auto", "always", "off"]),
    "spec_draft_max": _ints(1, 64),
    "spec_ngram_min": _ints(1, 16),
    "spec_ngram_max": _ints(1, 64),
}
DEFAULTS: dict[str, Any] = {
    "n_parallel": 4, "n_ctx": 8192, "n_batch": 512, "n_ubatch": None, "n_gpu_layers": -1,
    "threads": None, "flash_attn": "auto", "cache_type_k": "f16", "cache_type_v": "f16",
    "speculation": "auto", "spec_draft_max": 16, "spec_ngram_min": 2, "spec_ngram_max": 8,
}


def _combination_problems(v: dict[str, Any]) -> int:
    """How many of the rules between fields the values break (written apart from config.py)."""
    return sum([
        v["n_batch"] < v["n_parallel"],
        v["n_ubatch"] is not None and v["n_ubatch"] > v["n_batch"],
        v["cache_type_v"] != "f16" and v["flash_attn"] == "off",
        v["n_ctx"] < 64 * v["n_parallel"],
        v["spec_ngram_min"] > v["spec_ngram_max"],
    ])


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("GENSTRUCT_")]:
        monkeypatch.delenv(name)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(given_values=st.fixed_dictionaries({}, optional=FIELDS))
def test_engine_settings_end_in_one_line_per_error_and_exit_2(
    given_values: dict[str, _Value], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [f"--{name.replace('_', '-')}={text}" for name, (text, _) in given_values.items()]
    refused = sorted(name for name, (_, value) in given_values.items() if value is None)
    values = DEFAULTS | {name: value for name, (_, value) in given_values.items()}
    expected = len(refused) or _combination_problems(values)
    if not expected:
        settings_from_args(args)  # accepted (serving it is not this test's business)
        return
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2 and out == "", err
    assert "Traceback" not in err
    assert len(lines) == expected, (args, lines)
    assert all(line.startswith(PREFIX) and len(line) > len(PREFIX) for line in lines), lines
    if refused:  # each field refused on its own names the field
        assert sorted(line.removeprefix(PREFIX).split(":")[0] for line in lines) == refused


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--n-parallel", "8", "--n-batch", "4", "--cache-type-v", "q4_0", "--flash-attn",
             "off"],
            [
                "n_batch (4) must be at least n_parallel (8): every generating slot adds a "
                "token to each decode step",
                "cache_type_v q4_0 needs flash_attn auto or on",
            ],
        ),
        (["--n-ctx", str(2**32)], [f"n_ctx: Input should be less than or equal to {C_INT_MAX}"]),
        (["--n-parallel", "0", "--cache-type-k", "q5_1"], None),
    ],
)
def test_the_console_script_too(args: list[str], expected: list[str] | None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSTRUCT_")}
    result = subprocess.run(
        [str(SERVER), *args], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert all(line.startswith(PREFIX) for line in lines) and "Traceback" not in result.stderr
    if expected is None:
        assert [line.removeprefix(PREFIX).split(":")[0] for line in lines] == [
            "n_parallel", "cache_type_k"
        ]
    else:
        assert [line.removeprefix(PREFIX) for line in lines] == expected
