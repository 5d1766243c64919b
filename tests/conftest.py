"""Shared hooks of the test suite.

`pytest.importorskip` turns a package that is missing (or broken) into a skip. On a developer's
partial install that is a kindness; in `make test`, where the Makefile installs every one of
those packages, it would hide a broken install behind a row of quiet `s`. With `CI` set (the
Makefile sets it), such a skip is reported as a failure instead, during collection and during
a test alike. Skips for other reasons (a CPU that is not x86-64, AMX allowed) stay skips.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

pytest_plugins = ["pytester"]  # tests/unit/test_ci_skips.py runs this file's hooks in one


def _strict() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing_package_reason(report: pytest.CollectReport | pytest.TestReport) -> str | None:
    """The skip's reason when it is importorskip's, else None."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    # pytest.importorskip's two reasons: the import failed, or the version is too old.
    if reason.startswith("could not import ") or (
        reason.startswith("module ") and ", required is: " in reason
    ):
        return reason
    return None


def _fail(report: pytest.CollectReport | pytest.TestReport, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"CI is set, and a test needs a package the development install provides: {reason}. "
        "Run `make test` (which installs it), or unset CI to let it skip."
    )


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, Any]:
    report = yield
    reason = _missing_package_reason(report)
    if reason is not None and _strict():
        _fail(report, reason)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, Any]:
    report = yield
    reason = _missing_package_reason(report)
    if reason is not None and _strict():
        _fail(report, reason)
    return report
