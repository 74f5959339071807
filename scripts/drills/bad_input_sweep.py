"""Bad-input sweep: over a hundred malformed or hostile requests against the chat API, one at a time.

Starts the serving graph with the `test` preset on a free port, with remote image URLs allowed from a list of
loopback, private and metadata addresses (so the public-address check is what has to refuse them), or targets a
running server with --url. The server it starts fetches media through the sandbox (`media_sandbox`): host names
are answered from SANDBOX_HOSTS, never DNS, and the transport connects to loopback only and records every attempt,
so even a regressed check sends no packet off the machine. Prints one line per request (status, error code, what
was sent) and a summary: tried, 2xx, 4xx, 5xx, no answer, statuses other than expected, refusals for another
reason than expected, remote fetches attempted, Serve replica restarts (Ray state API), peak RSS growth of the
server processes (sampled every 0.1 s), and whether a real chat completion still works. Goal: 0 5xx, 0 wrong
reasons, 0 fetch attempts and 0 restarts.

    python scripts/drills/bad_input_sweep.py                              # about a minute on 2 cores
    python scripts/drills/bad_input_sweep.py --url http://127.0.0.1:8000 --preset cpu  # restarts and RSS: n/a
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image

import bad_media as media
from drillkit import RssSampler, local_ray, print_table, server_processes, start_serve
from trimodal.inference.media_fetch import is_loopback, read_attempts

MODEL = "trimodal-test"
"""The model id the cases name (the test preset's default id); `all_cases` names another served preset's."""
TEST_MAX_PIXELS = 4096 * 1024
"""The test preset's serving.max_image_pixels."""
SERVE_ARGS = {"preset": "test", "run": "none", "threads": 1}
PRIVATE_HOSTS = ("127.0.0.1", "10.0.0.1", "169.254.169.254", "::1", "localhost", "0.0.0.0", "2130706433",
                 "0x7f000001", "::ffff:127.0.0.1", "192.168.1.1", "172.16.0.1", "100.64.0.1", "fe80::1",
                 "224.0.0.1", "metadata.google.internal")
"""Hosts on the sweep server's media allow-list: every one must still be refused for its address."""
CONTROL_HOST, CONTROL_ADDRESS = "public-image.test", "93.184.215.14"
"""An allowed host the sandbox resolves to a public address: check_public lets it through, so the transport gets
the request, records it and refuses it without a socket (proof that the recorder sees what reaches it)."""
SANDBOX_HOSTS = {"localhost": ["127.0.0.1", "::1"], "metadata.google.internal": ["169.254.169.254"],
                 CONTROL_HOST: [CONTROL_ADDRESS]}
"""The sandbox's resolver table (literal addresses, 2130706433 and 0x7f000001 included, need no entry)."""
NON_PUBLIC = "non-public address"


@dataclass
class Case:
    """One request: a JSON-able body (or raw bytes), or a whole raw HTTP request for framing errors."""

    name: str
    body: object = None
    expect: tuple[int, ...] = (400,)
    method: str = "POST"
    path: str = "/v1/chat/completions"
    raw_http: bytes | None = None
    reason: str = ""
    """Text the refusal's message must contain (empty: any)."""


@dataclass
class Outcome:
    case: Case
    status: int | None
    code: str = ""
    seconds: float = 0.0
    message: str = ""

    @property
    def wrong_reason(self) -> bool:
        """Refused, but not for the reason the case expects."""
        return bool(self.case.reason) and self.case.reason not in self.message


def ask(content, **fields) -> dict:
    """A chat request with one user message."""
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def image(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def url_image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def audio(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def json_cases() -> list[Case]:
    """Bodies that are not a usable JSON object."""
    return [
        Case("empty body", b""), Case("invalid JSON", b"{not json"), Case("JSON null", b"null"),
        Case("JSON array", b"[1, 2]"), Case("JSON string", b'"hello"'),
        Case("invalid UTF-8 bytes", b'{"messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}'),
        Case("NaN literal", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
        Case("number 1e999 (infinity)", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}'),
        Case("array nested 100,000 deep", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        Case("object nested 50,000 deep", b'{"a": ' * 50_000 + b"1" + b"}" * 50_000),
        Case("nesting 40 deep (over 32)", {"messages": [{"role": "user", "content": "hi"}],
                                          "x": json.loads("[" * 38 + "]" * 38)}),
        Case("form-encoded body", b"messages=hi&max_tokens=4"),
    ]


def message_cases() -> list[Case]:
    """Malformed messages and content parts."""
    return [
        Case("no messages", {"model": MODEL}), Case("messages null", {"messages": None}),
        Case("messages empty list", {"messages": []}), Case("messages a string", {"messages": "hi"}),
        Case("message null", {"messages": [None]}), Case("message without content", {"messages": [{"role": "user"}]}),
        Case("unknown role", {"messages": [{"role": "tool", "content": "x"}]}),
        Case("content a number", ask(123)), Case("content empty string", ask("")), Case("content empty list", ask([])),
        Case("content whitespace only", ask("   \n\t ")), Case("part without type", ask([{}])),
        Case("part type video", ask([{"type": "video", "video": {}}])),
        Case("part type input_image", ask([{"type": "input_image", "image_url": "x"}])),
        Case("part type null", ask([{"type": None}])), Case("text part without text", ask([{"type": "text"}])),
        Case("text part, text a number", ask([{"type": "text", "text": 5}])),
        Case("only a system message", {"messages": [{"role": "system", "content": "be brief"}]}),
        Case("assistant message with an image", {"messages": [{"role": "user", "content": "hi"}, {
            "role": "assistant", "content": [image(media.png(8, 8))]}]}),
        Case("text with a lone surrogate", ask("caf\ud800 au lait")),
        Case("1,000,000-character prompt", ask("x" * 1_000_000), reason="far over the limit of"),
        Case("20,000 messages", {"messages": [{"role": "user", "content": "hi"}] * 20_000}),
    ]


def param_cases() -> list[Case]:
    """Sampling fields out of range or of the wrong type."""
    hi = [{"role": "user", "content": "hi"}]
    values = [("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 10**9), ("max_tokens", 10**30),
              ("max_tokens", 1.5), ("max_tokens", "10"), ("max_tokens", True), ("max_completion_tokens", -1),
              ("temperature", -1), ("temperature", 3), ("temperature", "hot"), ("top_p", 0), ("top_p", 2),
              ("stop", 7), ("stop", [""]), ("stop", ["a", "b", "c", "d", "e"]), ("stop", "s" * 1000),
              ("n", 2), ("stream", "yes"), ("stream_options", "x"), ("seed", "x"), ("tools", [{"type": "function"}]),
              ("logprobs", True), ("response_format", {"type": "json_object"}), ("presence_penalty", 1.0),
              ("model", 42)]
    return [Case(f"{name} = {str(value)[:20]}", {"messages": hi, name: value}) for name, value in values]


def image_cases(max_pixels: int) -> list[Case]:
    """Broken, hostile and extreme images (`max_pixels`: the server's serving.max_image_pixels, at least 4M)."""
    over = max_pixels // 4096 + 1  # 4096 x over > max_pixels
    ok = media.png(64, 64)
    jpeg = media.encoded(Image.new("RGB", (64, 64), (9, 90, 9)), "JPEG")
    return [
        Case("base64 with invalid characters", ask([url_image("data:image/png;base64,@@not-base64@@")])),
        Case("base64 with bad padding", ask([url_image("data:image/png;base64,iVBORw0KGgo")])),
        Case("base64 url-safe alphabet", ask([url_image(
            "data:image/png;base64," + base64.urlsafe_b64encode(ok).decode().replace("=", "") + "-_")])),
        Case("data: URL not base64", ask([url_image("data:image/png,rawbytes")])),
        Case("data: URL with empty payload", ask([url_image("data:image/png;base64,")])),
        Case("image_url a string", ask([{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}])),
        Case("image_url.url a number", ask([{"type": "image_url", "image_url": {"url": 7}}])),
        Case("non-image bytes", ask([image(b"this is plain text, not an image")])),
        Case("truncated PNG", ask([image(ok[: len(ok) // 2])])), Case("PNG signature only", ask([image(ok[:8])])),
        Case("PNG with a corrupted chunk CRC", ask([image(ok[:30] + bytes([ok[30] ^ 0xFF]) + ok[31:])])),
        Case("truncated JPEG", ask([image(jpeg[: len(jpeg) // 2], "image/jpeg")])),
        Case("JPEG start marker only", ask([image(b"\xff\xd8\xff", "image/jpeg")])),
        Case("1x1 PNG (valid)", ask([image(media.png(1, 1)), {"type": "text", "text": "colour?"}]), expect=(200,)),
        Case("1 x 4,000,000 PNG (valid, under the pixel limit)", ask([image(media.png(1, 4_000_000))]), expect=(200,)),
        Case("4,000,000 x 1 PNG (valid, under the pixel limit)", ask([image(media.png(4_000_000, 1))]), expect=(200,)),
        Case(f"4096 x {over} PNG (just over the pixel limit)", ask([image(media.png(4096, over))])),
        Case("30000 x 30000 PNG (110 KB on the wire)", ask([image(media.png_bomb(30_000, 30_000))])),
        Case("PNG bomb: 10000 x 10000 1-bit", ask([image(media.png_bomb(10_000, 10_000))])),
        Case("PNG bomb: IDAT inflating to 200 MB for 8x8 pixels", ask([image(media.png_idat_bomb())]),
             expect=(200, 400)),
        Case("PNG bomb: zTXt chunk inflating to 100 MB", ask([image(media.png_with_chunk(
            b"zTXt", b"comment\0\0" + media.zeros_deflated(100 << 20)))]), expect=(200, 400)),
        Case("PNG bomb: iCCP profile inflating to 100 MB", ask([image(media.png_with_chunk(
            b"iCCP", b"icc\0\0" + media.zeros_deflated(100 << 20)))]), expect=(200, 400)),
        Case("GIF claiming a 65535 x 65535 screen", ask([image(media.gif_with_screen(65_535, 65_535), "image/gif")])),
        Case("JPEG claiming 65500 x 65500", ask([image(media.jpeg_with_size(65_500, 65_500), "image/jpeg")])),
        Case("SVG document", ask([image(b'<svg xmlns="http://www.w3.org/2000/svg" width="9"/>', "image/svg+xml")])),
        Case("EPS document (Ghostscript)", ask([image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n")])),
        Case("DDS with unknown pixel format", ask([image(_broken_dds())])),
        Case("TGA image (not an accepted format)", ask([image(media.encoded(Image.new("RGB", (8, 8)), "TGA"))])),
        Case("five images (limit 4)", ask([image(ok)] * 5)),
    ]


def _broken_dds() -> bytes:
    data = bytearray(media.encoded(Image.new("RGB", (4, 4)), "DDS"))
    data[80:84] = bytes(4)  # pixel format flags 0
    return bytes(data)


def audio_cases() -> list[Case]:
    """Broken, hostile and extreme audio."""
    return [
        Case("non-audio bytes as WAV", ask([audio(media.png(8, 8))])),
        Case("empty audio data", ask([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])),
        Case("audio data not base64", ask([{"type": "input_audio", "input_audio": {"data": "%", "format": "wav"}}])),
        Case("audio format aac", ask([audio(media.wav(0.5), "aac")])),
        Case("audio format missing", ask([{"type": "input_audio", "input_audio": {"data": "AAAA"}}])),
        Case("input_audio a string", ask([{"type": "input_audio", "input_audio": "AAAA"}])),
        Case("RIFF header with garbage", ask([audio(b"RIFF\x10\x00\x00\x00WAVEgarbage-garbage")])),
        Case("WAV at 500 Hz", ask([audio(media.wav_header(500, 1))])),
        Case("WAV with 64 channels", ask([audio(media.wav_header(16000, 64))])),
        Case("WAV with sample rate 0", ask([audio(media.wav_header(0, 1))])),
        Case("WAV of NaN samples", ask([audio(media.wav(0.5, value=float("nan")))])),
        Case("3-minute WAV (limit 120 s)", ask([audio(media.wav(180, rate=8000))])),
        Case("2-hour silent OGG", ask([audio(media.silent_ogg(7200), "ogg")])),
        Case("truncated OGG", ask([audio(media.silent_ogg(60)[:500], "ogg")])),
        Case("MP3 of random bytes", ask([audio(bytes(range(256)) * 8, "mp3")])),
    ]


def url_cases() -> list[Case]:
    """Remote image URLs at private, loopback and metadata addresses, odd schemes and credentials."""
    urls = [(f"http://{h if ':' not in h else f'[{h}]'}/image.png", NON_PUBLIC) for h in PRIVATE_HOSTS]
    scheme = "must be http(s)://host/"
    urls += [("http://169.254.169.254/latest/meta-data/iam/", NON_PUBLIC), ("file:///etc/passwd", scheme),
             ("ftp://127.0.0.1/a.png", scheme), ("gopher://127.0.0.1:6379/_INFO", scheme),
             ("http://user:secret@127.0.0.1/a.png", "must not carry credentials"),
             ("https://example.com/cat.png", "not in the allowed media domains"),
             ("http://[::1]:6379/", NON_PUBLIC), ("javascript:alert(1)", scheme)]
    return [Case(f"image URL {u}", ask([url_image(u)]), reason=reason) for u, reason in urls]


def allowed_domains() -> str:
    """TRIMODAL_ALLOWED_MEDIA_DOMAINS of the sweep server: the hostile hosts and the sandbox's control host."""
    return ",".join((*PRIVATE_HOSTS, CONTROL_HOST))


def sandbox_args(record: Path) -> dict:
    """The server's media_sandbox setting: SANDBOX_HOSTS, attempts recorded in `record`."""
    return {"media_sandbox": {"record": str(record), "hosts": SANDBOX_HOSTS}}


def control_fetch(url: str) -> Outcome:
    """Ask for an image at CONTROL_HOST: the transport must be asked, record it, and refuse it (a 400)."""
    case = Case(f"image URL http://{CONTROL_HOST}/image.png (sandbox control)",
                ask([url_image(f"http://{CONTROL_HOST}/image.png")]),
                reason="the loopback-only media transport refused to connect to " + CONTROL_ADDRESS)
    with httpx.Client(timeout=60) as client:
        outcome = send(client, url, case)
    print_outcome(outcome)
    return outcome


def http_cases(limit: int) -> list[Case]:
    """Oversized bodies, lying or broken framing, wrong methods and routes."""
    return [
        Case(f"body of {limit + 1_000_000:,} bytes", b'{"pad": "' + b"x" * (limit + 1_000_000) + b'"}', (413,)),
        Case("Content-Length: 10^12, tiny body", raw_http=_raw("Content-Length: 1000000000000", b"{}"), expect=(413,)),
        Case("Content-Length: abc", raw_http=_raw("Content-Length: abc", b"{}"), expect=(400,)),
        Case("Content-Length: -1", raw_http=_raw("Content-Length: -1", b"{}"), expect=(400,)),
        Case("Content-Length and chunked both", raw_http=_raw("Content-Length: 2\r\nTransfer-Encoding: chunked",
                                                              b"0\r\n\r\n"), expect=(400,)),
        Case("100 KB header", raw_http=_raw("X-Pad: " + "a" * 100_000 + "\r\nContent-Length: 2", b"{}"),
             expect=(400, 413, 431)),
        Case("GET on the chat route", method="GET", expect=(405,)),
        Case("DELETE /v1/models", method="DELETE", path="/v1/models", expect=(405,)),
        Case("POST /v1/completions (no such route)", ask("hi"), path="/v1/completions", expect=(404,)),
    ]


def _raw(headers: str, body: bytes) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def all_cases(limit: int, model: str = MODEL, max_pixels: int = TEST_MAX_PIXELS) -> list[Case]:
    """Every case, in a stable order, for a server whose body limit is `limit` and image pixel limit `max_pixels`;
    a body that names a model by a string names `model`, the served preset's id (`trimodal-PRESET`), so each case
    is refused for its own fault and not as an unknown model (404)."""
    cases = json_cases() + message_cases() + param_cases() + image_cases(max_pixels) + audio_cases() + \
        url_cases() + http_cases(limit)
    return [_naming(case, model) for case in cases]


def cases_for(preset: str, overrides: dict | None = None) -> list[Case]:
    """Every case for a server of `preset` (name or path, with config overrides): its model id and limits."""
    from trimodal.config import load_config

    cfg = load_config(preset, overrides)
    return all_cases(cfg.serving.max_body_bytes, f"trimodal-{cfg.name}", cfg.serving.max_image_pixels)


def _naming(case: Case, model: str) -> Case:
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return replace(case, body={**body, "model": model})
    return case


def send_raw(url: str, request: bytes) -> int | None:
    """Send a whole HTTP request over a socket; the status of the answer (None: no answer)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        try:
            sock.sendall(request)
            head = sock.recv(64)
        except OSError:
            return None
    fields = head.split(b" ", 2)
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def send(client: httpx.Client, url: str, case: Case) -> Outcome:
    """Send one case; its status, OpenAI error code and message."""
    start = time.perf_counter()
    if case.raw_http is not None:
        return Outcome(case, send_raw(url, case.raw_http), seconds=time.perf_counter() - start)
    body = case.body if isinstance(case.body, bytes) or case.body is None else json.dumps(case.body).encode()
    try:
        response = client.request(case.method, url + case.path, content=body,
                                  headers={"Content-Type": "application/json"})
    except httpx.HTTPError as exc:
        return Outcome(case, None, type(exc).__name__, time.perf_counter() - start)
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {"code": "(not JSON)"}
    return Outcome(case, response.status_code, str(error.get("code") or ""), time.perf_counter() - start,
                   str(error.get("message") or ""))


@dataclass
class Sweep:
    """The sweep's results and server-side figures."""

    outcomes: list[Outcome] = field(default_factory=list)
    restarts: int | None = None
    rss: RssSampler | None = None
    still_serving: bool = False
    fetch_attempts: list[dict] | None = None
    """What the sandbox transport was asked to fetch during the sweep (None: no sandbox to read)."""

    @property
    def non_loopback_attempts(self) -> list[dict]:
        return [a for a in self.fetch_attempts or [] if not is_loopback(a["host"])]


def run_sweep(url: str, cases: list[Case], watch_server: bool, media_record: Path | None = None) -> Sweep:
    """Warm up, then send every case one at a time (counting restarts and sampling server RSS if watching, and
    reading the sandbox's record of fetch attempts when given)."""
    sweep = Sweep()
    earlier = len(read_attempts(media_record)) if media_record is not None else 0
    with httpx.Client(timeout=120) as client:
        warm_up = ask([image(media.png(64, 64)), audio(media.wav(1.0)), {"type": "text", "text": "hi"}], max_tokens=4)
        client.post(url + "/v1/chat/completions", json=warm_up).raise_for_status()  # first-use allocations
        before = server_processes() if watch_server else {}
        sweep.rss = RssSampler(dict(before.values())) if watch_server else None
        with sweep.rss or contextlib.nullcontext():
            for case in cases:
                sweep.outcomes.append(send(client, url, case))
                print_outcome(sweep.outcomes[-1])
        reply = client.post(url + "/v1/chat/completions", json=ask("still there?", max_tokens=4))
        sweep.still_serving = reply.status_code == 200
    if watch_server:
        after = server_processes()
        sweep.restarts = len(before.keys() - after.keys()) + sum(after[k] != v for k, v in before.items() if k in after)
    if media_record is not None:
        sweep.fetch_attempts = read_attempts(media_record)[earlier:]
    return sweep


def print_outcome(o: Outcome) -> None:
    mark = "" if o.status in o.case.expect else f"  <- expected {'/'.join(map(str, o.case.expect))}"
    mark += f"  <- not refused for: {o.case.reason}: {o.message[:100]}" if o.wrong_reason else ""
    print(f"{o.status or '-':>4} {o.code[:26]:<26} {o.seconds:5.2f}s  {o.case.name[:80]}{mark}", flush=True)


def report(sweep: Sweep) -> None:
    """The summary table."""
    classes = Counter("no answer" if o.status is None else f"{o.status // 100}xx" for o in sweep.outcomes)
    unexpected = [o for o in sweep.outcomes if o.status not in o.case.expect]
    na = "n/a (--url: not watching the server)"
    print_table("bad-input sweep", [
        ("requests tried", len(sweep.outcomes)), ("2xx (valid edge cases)", classes["2xx"]),
        ("4xx", classes["4xx"]), ("5xx", classes["5xx"]), ("no answer", classes["no answer"]),
        ("status other than expected", len(unexpected)),
        ("refused for another reason than expected", sum(o.wrong_reason for o in sweep.outcomes)),
        ("remote fetches attempted (non-loopback)", na if sweep.fetch_attempts is None else
         f"{len(sweep.fetch_attempts)} ({len(sweep.non_loopback_attempts)})"),
        ("server restarts (Serve replicas, proxy, controller)", na if sweep.restarts is None else sweep.restarts),
        *rss_rows(sweep.rss, na),
        ("a chat completion works afterwards", sweep.still_serving)])


def rss_rows(rss: RssSampler | None, na: str) -> list[tuple[str, str]]:
    """Table rows for the server processes' memory."""
    if rss is None:
        return [("peak RSS growth of the server processes", na)]
    name, grown = rss.largest()
    return [(f"peak RSS growth, {len(rss.names)} server processes summed", f"{rss.peak_growth_mb:.0f} MB"),
            ("largest single-process peak growth", f"{grown:.0f} MB ({name})"),
            ("RSS growth still held after the sweep", f"{rss.retained_mb:.0f} MB")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start the test preset on a free port)")
    parser.add_argument("--preset", default="test", help="with --url: the preset it serves (its model id and limits)")
    args = parser.parse_args()
    cases = cases_for(args.preset if args.url else "test")
    if args.url:
        report(run_sweep(args.url.rstrip("/"), cases, watch_server=False))
        return
    from ray import serve

    with local_ray(num_cpus=4), tempfile.TemporaryDirectory(prefix="sweep-media-") as tmp:
        record = Path(tmp) / "fetch-attempts.jsonl"
        url = start_serve({**SERVE_ARGS, **sandbox_args(record)},
                          env={"TRIMODAL_ALLOWED_MEDIA_DOMAINS": allowed_domains()})
        print(f"serving the test preset at {url}; {len(cases)} requests")
        try:
            report(run_sweep(url, cases, watch_server=True, media_record=record))
            control = control_fetch(url)
            print(f"sandbox control: {control.status}, transport records {read_attempts(record)[-1:]}")
        finally:
            serve.shutdown()

if __name__ == "__main__":
    main()
