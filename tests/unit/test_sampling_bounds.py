"""One table of sampling bounds: requests, the engine and the server's defaults agree on it."""

from __future__ import annotations

import dataclasses
import math

import pytest
from genstruct.v1 import genstruct_pb2 as pb
from genstruct_service.config import Settings
from genstruct_service.engine.types import SAMPLING_BOUNDS, Bound, Sampling, sampling_problem
from genstruct_service.errors import InvalidRequest
from genstruct_service.validation import to_generation_request
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

SETTINGS = Settings(_cli_parse_args=False)


def edges(bound: Bound) -> list[float]:
    """Values on, just inside and just outside each end of `bound`."""
    step = 1 if isinstance(bound.low, int) and isinstance(bound.high, int) else 1e-6
    return [bound.low - step, bound.low, bound.low + step, bound.high - step, bound.high,
            bound.high + step]  # fmt: skip


def request_refuses(name: str, value: float) -> bool:
    params = pb.SamplingParams(**{name: value})  # type: ignore[arg-type]
    request = pb.GenerateRequest(document=pb.Document(title="T", content="c"), sampling=params)
    try:
        to_generation_request(request, SETTINGS)
    except InvalidRequest as exc:
        assert exc.field == f"sampling.{name}"
        return True
    return False


def engine_refuses(name: str, value: float) -> bool:
    sampling = dataclasses.replace(Sampling(), **{name: value})
    return sampling_problem(sampling) is not None


def settings_refuse(name: str, value: float) -> bool:
    try:
        Settings(_cli_parse_args=False, **{name: value})  # type: ignore[arg-type]
    except ValidationError:
        return True
    return False


def as_sent(name: str, value: float) -> float:
    """`value` as the request carries it: top_k is an integer, the rest are 32-bit floats."""
    if name == "top_k":
        return int(value)
    return pb.SamplingParams(**{name: value}).__getattribute__(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(SAMPLING_BOUNDS))
def test_requests_the_engine_and_settings_refuse_the_same_values(name: str) -> None:
    for value in edges(SAMPLING_BOUNDS[name]):
        sent = as_sent(name, value)
        if name == "top_k" and sent < 0:
            continue  # a uint32 cannot carry it
        verdicts = (request_refuses(name, sent), engine_refuses(name, sent),
                    settings_refuse(name, sent))  # fmt: skip
        assert len(set(verdicts)) == 1, (name, sent, verdicts)


@pytest.mark.parametrize("name", list(SAMPLING_BOUNDS))
def test_each_bound_refuses_something_and_accepts_something(name: str) -> None:
    verdicts = {engine_refuses(name, v) for v in edges(SAMPLING_BOUNDS[name])}
    assert verdicts == {True, False}


@given(st.sampled_from(list(SAMPLING_BOUNDS)), st.floats(allow_nan=True, width=32))
def test_the_engine_refuses_exactly_what_the_bound_says(name: str, value: float) -> None:
    bound = SAMPLING_BOUNDS[name]
    inside = math.isfinite(value) and (
        (bound.low < value if bound.low_open else bound.low <= value)
        and (value < bound.high if bound.high_open else value <= bound.high)
    )
    assert engine_refuses(name, value) is not inside


def test_the_message_names_the_range() -> None:
    problem = sampling_problem(Sampling(top_p=0.0))
    assert problem == ("sampling.top_p", "is 0.0; it must be in (0, 1]")
