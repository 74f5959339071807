"""The suite's rule for CI (tests/conftest.py): with CI set, a skip from a test's body, one of its fixtures or a
skipif marker fails the test with the skip's one line; a gpu test still skips without CUDA; without CI, skips skip.
Each case runs a small test file through pytest in process, with the suite's conftest as its only plugin."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]
CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
CASES = '''
import pytest

@pytest.fixture
def environment():
    pytest.skip("needs the thing environment: make install-thing")

def test_body_skip():
    pytest.skip("needs `tool` (Debian package tool: apt-get install tool)")

def test_fixture_skip(environment):
    pass

@pytest.mark.skipif(True, reason="needs a marker condition: apt-get install marker")
def test_marker_skip():
    pass

@pytest.mark.gpu
def test_gpu():
    pass

def test_runs():
    pass
'''
NEEDS = {"test_body_skip": "apt-get install tool", "test_fixture_skip": "make install-thing",
         "test_marker_skip": "apt-get install marker"}


def outcomes(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> dict[str, tuple[str, str]]:
    """{test name: (outcome, its one line)} of CASES run with the suite's conftest."""
    suite = next(p for p in request.config.pluginmanager.get_plugins() if getattr(p, "__file__", None) == str(CONFTEST))
    pytester.makepyfile(test_cases=CASES)
    result = pytester.inline_run("-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning",
                                 plugins=[suite])
    found = {}
    for report in result.getreports("pytest_runtest_logreport"):
        if report.when == "call" or report.outcome != "passed":
            line = report.longrepr[2] if report.skipped else str(report.longrepr or "")
            found[report.nodeid.split("::")[-1]] = (report.outcome, line)
    return found


def test_under_ci_a_skip_fails_with_what_to_install(pytester, request, monkeypatch):
    monkeypatch.setenv("CI", "true")
    seen = outcomes(pytester, request)
    for name, install in NEEDS.items():
        outcome, line = seen[name]
        assert outcome == "failed" and install in line and "CI is set" in line and "\n" not in line, seen[name]
    assert seen["test_runs"][0] == "passed"
    if not torch.cuda.is_available():
        assert seen["test_gpu"][0] == "skipped" and "CUDA" in seen["test_gpu"][1], seen["test_gpu"]


def test_without_ci_a_skip_skips(pytester, request, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    seen = outcomes(pytester, request)
    assert {name: seen[name][0] for name in NEEDS} == dict.fromkeys(NEEDS, "skipped"), seen
    assert all(install in seen[name][1] for name, install in NEEDS.items()), seen
    assert seen["test_runs"][0] == "passed"
