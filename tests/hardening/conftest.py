"""The hardening suite's scale (short by default, full with GENSTRUCT_HARDENING=full) and figures.

Every test records what it tried (requests, cancellations, memory before/after) in the
session's `figures`; they are printed at the end of the run and written as JSON to
$GENSTRUCT_HARDENING_FIGURES (default build/hardening-figures.json).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.hardening.harness import ROOT

FULL = os.environ.get("GENSTRUCT_HARDENING", "short").strip().lower() == "full"


@dataclass(frozen=True)
class Scale:
    """How much of everything to try; the short form keeps the suite within ~3 minutes."""

    name: str
    bad_input_examples: int  # hypothesis requests against the fake engine
    raw_examples: int  # hypothesis byte strings on a raw channel
    model_examples: int  # hypothesis requests against the real small model
    soak_streams: int  # concurrent GenerateBatch streams per soak round
    soak_docs: int  # documents per stream
    soak_rounds: int
    model_soak_streams: int  # the same against the real model
    model_docs: int  # documents of the real-model SIGTERM batch and per real soak stream
    flood_docs: int  # documents pushed by a sender that never reads
    bulk_docs: int  # documents of the real-model bulk run that is killed
    kills: int  # kill -9 / restarts during that run


SHORT = Scale("short", bad_input_examples=150, raw_examples=120, model_examples=12,
              soak_streams=24, soak_docs=16, soak_rounds=2, model_soak_streams=4, model_docs=2,
              flood_docs=3000, bulk_docs=6, kills=1)
LONG = Scale("full", bad_input_examples=1500, raw_examples=1000, model_examples=80,
             soak_streams=64, soak_docs=64, soak_rounds=5, model_soak_streams=16, model_docs=6,
             flood_docs=20000, bulk_docs=31, kills=2)


class Figures:
    """Named figures of the run, collected across tests."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def record(self, test: str, **values: Any) -> None:
        self.data.setdefault(test, {}).update(values)


_FIGURES = Figures()


@pytest.fixture(scope="session")
def scale() -> Scale:
    return LONG if FULL else SHORT


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Any:
    """`figures(key=value, ...)` records values under the running test's name."""

    def record(**values: Any) -> None:
        _FIGURES.record(request.node.name, **values)

    return record


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The full form's tests run longer than the suite's 300 s per-test timeout allows."""
    if FULL:
        for item in items:
            if "tests/hardening/" in item.nodeid.replace("\\", "/"):
                item.add_marker(pytest.mark.timeout(1800))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES.data:
        return
    scale = LONG if FULL else SHORT
    terminalreporter.section(f"hardening figures ({scale.name} form)")
    for test, values in _FIGURES.data.items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        terminalreporter.write_line(f"{test}: {shown}")
    default = ROOT / "build" / "hardening-figures.json"
    out = Path(os.environ.get("GENSTRUCT_HARDENING_FIGURES", default))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"scale": asdict(scale), "figures": _FIGURES.data}, indent=2,
                                  default=str) + "\n")
        terminalreporter.write_line(f"written to {out}")
    except OSError as exc:
        terminalreporter.write_line(f"could not write {out}: {exc}")
