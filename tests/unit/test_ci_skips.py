"""tests/conftest.py: with CI set, a skip for a missing package is a failure; other skips stay."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()

TESTS = """
import pytest

def test_in_a_test():
    pytest.importorskip("no_such_package_for_genstruct")

@pytest.fixture
def needs_it():
    return pytest.importorskip("no_such_package_for_genstruct")

def test_in_a_fixture(needs_it):
    pass

def test_too_old():
    pytest.importorskip("pytest", minversion="999")

@pytest.mark.skipif(True, reason="not this CPU")
def test_other_reason():
    pass

def test_skip_called():
    pytest.skip("AMX allowed")
"""

MODULE_LEVEL = """
import pytest

pytest.importorskip("no_such_package_for_genstruct")

def test_never_collected():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_skips=TESTS, test_module_level=MODULE_LEVEL)
    return pytester


@pytest.mark.parametrize("value", ["1", "true"])
def test_with_ci_a_missing_package_fails(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CI", value)
    result = suite.runpytest("-p", "no:cacheprovider", "test_skips.py")
    result.assert_outcomes(failed=2, errors=1, skipped=2)  # the fixture's is a setup error
    result.stdout.fnmatch_lines(["*CI is set*no_such_package_for_genstruct*"])
    # a module that skips as a whole when it is collected
    result = suite.runpytest("-p", "no:cacheprovider", "test_module_level.py")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*CI is set*no_such_package_for_genstruct*"])


@pytest.mark.parametrize("value", [None, "0", "false"])
def test_without_ci_it_skips(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    result = suite.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(skipped=6)
