"""The metric list: every metric the service records is documented where operators look (README, the serving and
cluster guides), names are valid Prometheus names, and refusals map to the reasons the docs give."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))  # serve_app lives at the repo root

from serve_app.metrics import METRICS, RequestTimings, rejection_reason  # noqa: E402


@pytest.mark.parametrize("doc", ["README.md", "docs/cluster.md", "docs/serving.md"])
def test_every_metric_is_listed_in_the_docs_under_its_exported_name(doc):
    text = (ROOT / doc).read_text()
    for name, (kind, _) in METRICS.items():
        assert f"ray_{name}{'_total' if kind == 'counter' else ''}" in text, (doc, name)


def test_metric_names_are_valid_prometheus_names():
    assert all(re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name) for name in METRICS)


@pytest.mark.parametrize("status,reason", [(200, None), (401, "unauthorized"), (413, "too_large"),
                                           (429, "overloaded"), (503, "overloaded"), (504, "timeout"),
                                           (400, "invalid"), (404, "invalid"), (500, None)])
def test_refusals_by_reason(status, reason):
    assert rejection_reason(status) == reason


def test_timings_report_first_token_and_decode_rate():
    timings = RequestTimings(arrived=10.0, encode_s=0.25)
    timings.token(10.5)
    timings.token(10.9)  # only the first text sets the first-token time
    timings.finish(completion_tokens=11, now=12.5)
    assert timings.report() == {"transcribe_s": None, "encode_s": 0.25, "first_token_s": 0.5, "tokens_per_s": 5.0}
