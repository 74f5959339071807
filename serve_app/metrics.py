"""The service's Prometheus metrics, recorded through Ray Serve's metrics API.

Ray exports them with the cluster's own metrics (each node's metrics agent, the port `ray start
--metrics-export-port` sets; the dashboard's Grafana reads the same), prefixed `ray_` and tagged with the
deployment, replica and application. Outside a Serve replica (the plain classes in unit tests) recording is a
no-op for Ray, and every object also keeps its own tallies, which `stats()` and the tests read.

`METRICS` lists every name, its type and what it measures: docs/serving.md prints the table for dashboards, the
README and docs/cluster.md the names.
"""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass, field

from ray.serve import metrics as serve_metrics

LATENCY_BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
"""Histogram buckets for durations, in seconds."""
RATE_BOUNDS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0]
"""Histogram buckets for decode rates, in tokens per second."""
BATCH_BOUNDS = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0, 128.0]
"""Histogram buckets for rows per decoding batch."""

METRICS: dict[str, tuple[str, str]] = {
    "trimodal_requests": ("counter", "HTTP requests answered, by route and status code"),
    "trimodal_rejected_requests": ("counter", "requests refused, by reason: unauthorized (401), too_large (413), "
                                              "overloaded (429/503), timeout (504), invalid (other 4xx)"),
    "trimodal_time_to_first_token_seconds": ("histogram", "from a chat request's arrival to its first token"),
    "trimodal_decode_tokens_per_second": ("histogram", "completion tokens per second of decoding, per request"),
    "trimodal_transcribe_seconds": ("histogram", "Whisper time per batch of clips (cache misses only)"),
    "trimodal_image_encode_seconds": ("histogram", "CLIP tower + projector time per batch of images (misses only)"),
    "trimodal_lm_queue_wait_seconds": ("histogram", "from a prompt reaching the LM replica to its first decode step"),
    "trimodal_lm_batch_rows": ("histogram", "rows decoded together, per decoding batch (batch occupancy)"),
    "trimodal_media_cache_hits": ("counter", "media cache lookups that skipped an encoder, by kind (audio, image)"),
    "trimodal_media_cache_misses": ("counter", "media cache lookups that ran an encoder, by kind (audio, image)"),
}
"""Every metric the service records: name -> (Prometheus type, meaning). Exported as `ray_<name>` (counters with
a `_total` suffix, histograms as `_bucket` / `_sum` / `_count`)."""


def rejection_reason(status: int) -> str | None:
    """Why a status code refused a request (None: it was not refused)."""
    if status == 401:
        return "unauthorized"
    if status == 413:
        return "too_large"
    if status in (429, 503):
        return "overloaded"
    if status == 504:
        return "timeout"
    return "invalid" if 400 <= status < 500 else None


def _counter(name: str, tags: tuple[str, ...] = ()) -> serve_metrics.Counter:
    return serve_metrics.Counter(name, description=METRICS[name][1], tag_keys=tags)


def _histogram(name: str, bounds: list[float]) -> serve_metrics.Histogram:
    return serve_metrics.Histogram(name, description=METRICS[name][1], boundaries=bounds)


@dataclass
class IngressMetrics:
    """What the HTTP front door records: requests, refusals, first-token latency and decode rate."""

    tallies: Tally = field(default_factory=Tally)
    """Local counts by (metric, tag), for tests and logs."""

    def __post_init__(self) -> None:
        self._requests = _counter("trimodal_requests", ("route", "status"))
        self._rejected = _counter("trimodal_rejected_requests", ("reason",))
        self._ttft = _histogram("trimodal_time_to_first_token_seconds", LATENCY_BOUNDS_S)
        self._rate = _histogram("trimodal_decode_tokens_per_second", RATE_BOUNDS)

    def request(self, route: str, status: int) -> None:
        """One answered request (and its refusal reason, if it was refused)."""
        self._requests.inc(1, tags={"route": route, "status": str(status)})
        self.tallies[("requests", route, status)] += 1
        reason = rejection_reason(status)
        if reason:
            self._rejected.inc(1, tags={"reason": reason})
            self.tallies[("rejected", reason)] += 1

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)
        self.tallies[("first_token",)] += 1

    def decode_rate(self, tokens: int, seconds: float) -> None:
        """A finished answer's completion tokens over its decoding time (first token to last)."""
        if tokens > 1 and seconds > 0:
            self._rate.observe((tokens - 1) / seconds)
            self.tallies[("decode_rate",)] += 1


@dataclass
class EncoderMetrics:
    """What a media encoder replica (Speech or Vision) records: encoder seconds and cache hits / misses."""

    kind: str
    """audio or image."""
    tallies: Tally = field(default_factory=Tally)

    def __post_init__(self) -> None:
        name = "trimodal_transcribe_seconds" if self.kind == "audio" else "trimodal_image_encode_seconds"
        self._seconds = _histogram(name, LATENCY_BOUNDS_S)
        self._hits = _counter("trimodal_media_cache_hits", ("kind",))
        self._misses = _counter("trimodal_media_cache_misses", ("kind",))

    def encoded(self, seconds: float) -> None:
        self._seconds.observe(seconds)
        self.tallies["encoded"] += 1

    def lookups(self, hits: int, misses: int) -> None:
        """Export cache hits and misses (the cache's own stats are the local count)."""
        if hits:
            self._hits.inc(hits, tags={"kind": self.kind})
        if misses:
            self._misses.inc(misses, tags={"kind": self.kind})


@dataclass
class LanguageModelMetrics:
    """What a LanguageModel replica records: queue wait and batch occupancy."""

    tallies: Tally = field(default_factory=Tally)

    def __post_init__(self) -> None:
        self._wait = _histogram("trimodal_lm_queue_wait_seconds", LATENCY_BOUNDS_S)
        self._rows = _histogram("trimodal_lm_batch_rows", BATCH_BOUNDS)

    def queue_wait(self, seconds: float) -> None:
        self._wait.observe(seconds)
        self.tallies["queue_wait"] += 1

    def batch(self, rows: int) -> None:
        self._rows.observe(rows)
        self.tallies["batches"] += 1


@dataclass
class RequestTimings:
    """Where one chat request's time went, as the response reports it (`timings`) and the web page shows it."""

    arrived: float
    """time.perf_counter() when the request arrived."""
    transcribe_s: float | None = None
    """Seconds until every clip was transcribed (None: no audio)."""
    encode_s: float | None = None
    """Seconds until every image was encoded (None: no image)."""
    first_token_s: float | None = None
    """Seconds from arrival to the answer's first generated token (its text may come with a later one)."""
    decode_s: float | None = None
    """Seconds from the first token to the last."""
    completion_tokens: int = 0

    def token(self, now: float) -> None:
        """A token was generated by `now`: the first time sets first_token_s."""
        if self.first_token_s is None:
            self.first_token_s = now - self.arrived

    def finish(self, completion_tokens: int, now: float) -> None:
        self.completion_tokens = completion_tokens
        if self.first_token_s is not None:
            self.decode_s = now - self.arrived - self.first_token_s

    def report(self) -> dict:
        """{transcribe_s, encode_s, first_token_s, tokens_per_s} rounded for clients (None where not measured)."""
        rate = None
        if self.decode_s and self.completion_tokens > 1:
            rate = round((self.completion_tokens - 1) / self.decode_s, 2)
        rounded = {k: (round(v, 4) if v is not None else None) for k, v in
                   (("transcribe_s", self.transcribe_s), ("encode_s", self.encode_s),
                    ("first_token_s", self.first_token_s))}
        return {**rounded, "tokens_per_s": rate}
