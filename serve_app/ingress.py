"""The HTTP ingress as a plain class: an OpenAI-compatible API and the web page, on Starlette. No Ray import.

A chat request is read with a size cap, validated (JSON, sampling fields, messages and media, all cheap and
in a worker thread), then its audio clips are transcribed and its images encoded concurrently by the Speech
and Vision deployments, and the answer is streamed from the LanguageModel. Every refusal is an OpenAI-shaped
JSON error; overload (the handle's queue is full) and a model replica that died under the request (Serve starts
a new one) are 503s with Retry-After; a request past its deadline is a 504 (or, mid-stream, an error event); a
client that goes away cancels its row in the LanguageModel. A prompt whose text is far over the LM's token limit
is refused here, by counting characters, before any media is decoded or any tokenizer runs. A run whose files
cannot be loaded (its projector by Vision, its adapter by the LanguageModel) is a 424 `run_unavailable` naming the
run and the file, and the registry leaves it out of /v1/models until its files change.

`/healthz` is liveness (this process answers); `/readyz` is readiness: 200 only while Speech, Vision and the
LanguageModel each answer a cheap call within `ready_timeout_s`, else 503 naming the parts that did not.

The three model deployments arrive as DeploymentHandles (the unit tests wrap plain objects in stand-ins with the
same call shape).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from trimodal.inference.media_fetch import MediaFetcher, MediaSandbox
from trimodal.inference.messages import MediaLimits, ParsedRequest, RequestError, parse_messages, text_chars
from trimodal.inference.openai_api import (SSE_DONE, ApiError, ChatRequest, RequestLimits, bad_request,
                                           chunk_object, completion_object, error_body, models_object,
                                           parse_chat_request, parse_json_body, sse_event, usage_object)
from trimodal.inference.requests import GenerationRequest, RunBundle

from serve_app.metrics import IngressMetrics, RequestTimings
from serve_app.registry import ModelEntry, RunRegistry, RunUnavailable, UnknownModel

log = logging.getLogger("trimodal.serve")
STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                                           "connect-src 'self'; object-src 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@dataclass
class IngressSettings:
    """Everything the ingress needs, resolved once by the builder (env vars included)."""

    model_id: str
    """The id /v1/models reports and responses carry."""
    limits: RequestLimits
    media: MediaLimits
    max_body_bytes: int
    request_timeout_s: float
    preset: str = "custom"
    run_name: str | None = None
    """The run's name (its directory relative to the runs directory), never a server path; None: no run."""
    api_key: str | None = None
    """Bearer key guarding every route but /healthz and /readyz (None: open)."""
    allowed_media_domains: tuple[str, ...] = ()
    """Hosts remote image URLs may come from (empty: remote URLs refused)."""
    media_sandbox: MediaSandbox | None = None
    """Tests and drills: resolve image hosts from a table and fetch through a recording loopback-only transport."""
    fetch_timeout_s: float = 10.0
    retry_after_s: int = 1
    """Retry-After seconds on a 503."""
    ready_timeout_s: float = 2.0
    """How long /readyz waits for each deployment's answer."""
    max_prompt_tokens: int = 0
    """The LanguageModel's prompt limit in tokens (0: no character pre-check)."""
    max_prompt_chars: int = 0
    """Text over this many characters is refused before tokenising (see settings.CHARS_PER_TOKEN; 0: no check)."""
    run_note: str = ""
    """How the run was chosen (for /v1/models; names, not paths)."""
    runs_dir: str | None = field(default=None, repr=False)
    """Where the finished runs a request may name with `model` are found (None: only the default and the base);
    a server path, so kept out of repr and logs, like default_run's."""
    default_run: RunBundle | None = field(default=None, repr=False)
    """The run that answers `model_id` (None: the base model)."""
    details: dict = field(default_factory=dict)


def shrink_image(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shortest side is `size` when it is longer, exactly as the CLIP preprocessing would.

    The tower then skips its own resize and only centre-crops, so the embeddings are unchanged while far
    fewer pixels travel to the Vision deployment.
    """
    w, h = image.size
    if min(w, h) <= size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)


def supplied_key(header: str) -> str:
    """The key in an Authorization header: `Bearer KEY`, or the password of `Basic base64(user:KEY)`."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


def entry_details(entry: ModelEntry) -> dict:
    """What /v1/models says of the base model or a run (names only)."""
    if entry.run is None:
        return {"run": None, "base": True, "adapter": False, "projector_trained": False}
    return {"run": entry.run.name, "base": False, "adapter": entry.run.adapter is not None,
            "projector_trained": True}


async def timed(calls: list) -> tuple[list, float | None]:
    """The results of `calls` and the seconds until the last one answered (None when there are none)."""
    if not calls:
        return [], None
    started = time.perf_counter()
    results = list(await asyncio.gather(*calls))
    return results, time.perf_counter() - started


def json_error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def media_fetcher(settings: IngressSettings) -> MediaFetcher | None:
    """The fetcher for remote image URLs: None when no host is allowed; sandboxed when the settings say so."""
    if not settings.allowed_media_domains:
        return None
    args = (settings.allowed_media_domains, settings.max_body_bytes, settings.fetch_timeout_s)
    return settings.media_sandbox.fetcher(*args) if settings.media_sandbox else MediaFetcher(*args)


class Ingress:
    """Routes: POST /v1/chat/completions, GET /v1/models, GET /healthz, GET /readyz, GET / (+ /static/*)."""

    PARTS = ("Speech", "Vision", "LanguageModel")

    def __init__(self, speech, vision, lm, settings: IngressSettings,
                 overload_errors: tuple[type[BaseException], ...] = (),
                 unavailable_errors: tuple[type[BaseException], ...] = ()):
        self.speech = speech
        self.vision = vision
        self.lm = lm
        self.lm_stream = lm.options(stream=True)
        self.settings = settings
        self.overload_errors = tuple(overload_errors)
        self.unavailable_errors = tuple(unavailable_errors)
        self.created = int(time.time())
        self.fetcher = media_fetcher(settings)
        self.static = {p.name: p.read_bytes() for p in STATIC_DIR.iterdir() if p.suffix in STATIC_TYPES}
        self.registry = RunRegistry(settings.runs_dir, settings.preset, settings.default_run)
        self.metrics = IngressMetrics()
        self._info: dict | None = None

    def asgi_app(self) -> Starlette:
        """The Starlette app serving every route."""
        routes = [Route("/healthz", self.healthz, methods=["GET"]),
                  Route("/readyz", self.readyz, methods=["GET"]),
                  Route("/", self._guard(self.page, "/", browser=True), methods=["GET"]),
                  Route("/static/{name}", self._guard(self.static_file, "/static", browser=True), methods=["GET"]),
                  Route("/v1/models", self._guard(self.models, "/v1/models"), methods=["GET"]),
                  Route("/v1/chat/completions", self._guard(self.chat_completions, "/v1/chat/completions"),
                        methods=["POST"])]
        handlers = {404: self._http_error, 405: self._http_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # -- plumbing -----------------------------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        """True when no key is set, or the request carries it (Bearer, or Basic auth's password)."""
        key = self.settings.api_key
        if not key:
            return True
        return hmac.compare_digest(supplied_key(request.headers.get("authorization", "")).encode(), key.encode())

    def _guard(self, handler: Callable[[Request], Awaitable[Response]], route: str, browser: bool = False):
        """Check the key, then turn ApiErrors and unexpected failures into OpenAI-shaped JSON errors; count the
        answer's status under `route` (metrics)."""
        async def counted(request: Request) -> Response:
            response = await guarded(request)
            self.metrics.request(route, response.status_code)
            return response

        async def guarded(request: Request) -> Response:
            if not self.authorized(request):
                challenge = 'Basic realm="trimodal", charset="UTF-8"' if browser else "Bearer"
                return json_error(ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                           code="invalid_api_key", headers={"WWW-Authenticate": challenge}))
            try:
                return await handler(request)
            except ApiError as err:
                return json_error(err)
            except self.overload_errors:
                return json_error(self._overloaded())
            except self.unavailable_errors as exc:
                log.warning("request to %s failed: a model replica died (%s)", request.url.path, type(exc).__name__)
                return json_error(self._unavailable())
            except Exception:
                log.exception("request to %s failed", request.url.path)
                return json_error(ApiError(500, "internal server error", kind="server_error"))
        return counted

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else exc.detail
        return json_error(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))

    def _overloaded(self) -> ApiError:
        return ApiError(503, "the server is overloaded; retry later", kind="server_error", code="overloaded",
                        headers={"Retry-After": str(self.settings.retry_after_s)})

    def _unavailable(self) -> ApiError:
        return ApiError(503, "a model replica stopped while serving this request and is being replaced; retry",
                        kind="server_error", code="model_unavailable",
                        headers={"Retry-After": str(self.settings.retry_after_s)})

    def _run_unavailable(self, entry: ModelEntry | str, reason: str) -> ApiError:
        """A run whose files cannot be loaded: 424 Failed Dependency, code `run_unavailable`. The request is well
        formed and names a listed run, so no 400/404; the fault is in the run's files on the server and persists
        until they change, so no 503 (a retry would fail alike; openai clients retry 5xx by themselves) and no bare
        500. 424 is what Hugging Face TGI answers when its model server fails a generation (its router's API:
        "424 Generation Error"). Left out of /v1/models from now on, until its files change."""
        name = entry.id if isinstance(entry, ModelEntry) else entry
        if isinstance(entry, ModelEntry):
            self.registry.mark_broken(entry, reason)
        log.warning("run %r cannot be loaded: %s", name, reason)
        return ApiError(424, str(RunUnavailable(name, reason)), "model", "run_unavailable", kind="server_error")

    def _timed_out(self) -> ApiError:
        return ApiError(504, f"the request took longer than {self.settings.request_timeout_s:g} s",
                        kind="server_error", code="timeout")

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 past max_body_bytes (by Content-Length, and by counting what arrives)."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise bad_request(f"Content-Length {declared!r} is not a number")
        if declared is not None and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes, over the limit of {limit}",
                           code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        return bytes(body)

    async def model_info(self) -> dict:
        """What is loaded (asked of the deployments once, then cached)."""
        if self._info is None:
            parts = await asyncio.gather(self.speech.describe.remote(), self.vision.describe.remote(),
                                         self.lm.describe.remote())
            info = {"preset": self.settings.preset, "run": self.settings.run_name, **self.settings.details}
            for part in parts:
                info.update(part)
            info["note"] = self._run_and_untrained_note(info)
            self._info = info
        return self._info

    def _run_and_untrained_note(self, info: dict) -> str:
        notes = [self.settings.run_note] if self.settings.run_note else []
        if not info.get("projector_trained"):
            notes.append("the image projector is UNTRAINED (no finished training run): image answers are noise")
        if info.get("vision_tower_untrained"):
            notes.append("the vision tower is UNTRAINED (random weights)")
        return "; ".join(notes)

    # -- routes -------------------------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """Liveness: this process answers (says nothing about the model deployments)."""
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Readiness: 200 while every deployment answers; else 503 naming the parts that do not, and why."""
        handles = (self.speech, self.vision, self.lm)
        answers = await asyncio.gather(*(self.probe(handle) for handle in handles))
        parts = dict(zip(self.PARTS, answers))
        not_ready = [name for name, answer in parts.items() if answer != "ready"]
        if not not_ready:
            return JSONResponse({"status": "ready", "deployments": parts})
        return JSONResponse({"status": "not ready", "not_ready": not_ready, "deployments": parts}, status_code=503,
                            headers={"Retry-After": str(self.settings.retry_after_s)})

    async def probe(self, handle) -> str:
        """'ready' when the deployment answers `describe` within ready_timeout_s, else why not."""
        call = handle.describe.remote()
        timeout = self.settings.ready_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await call
        except TimeoutError:
            call.cancel()
            return f"no answer within {timeout:g} s (starting, loading its model, or no live replica)"
        except Exception as exc:  # a dead replica (ActorDiedError, ...), an unavailable deployment
            return f"unavailable ({type(exc).__name__})"
        return "ready"

    async def page(self, request: Request) -> Response:
        return Response(self.static["index.html"], media_type=STATIC_TYPES[".html"], headers=PAGE_HEADERS)

    async def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.static or name == "index.html":
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        return Response(self.static[name], media_type=STATIC_TYPES[Path(name).suffix], headers=PAGE_HEADERS)

    async def models(self, request: Request) -> Response:
        """The default id (with what is loaded), the base model, and every finished run of this preset."""
        entries = await asyncio.to_thread(self.registry.entries)
        default = await self.model_info()
        listed = [(e.id, e.created, default if e.id == self.settings.model_id else entry_details(e))
                  for e in entries]
        return JSONResponse(models_object(listed))

    async def resolve_model(self, model: str | None) -> ModelEntry:
        """The entry `model` names; a 404 model_not_found when it names none."""
        try:
            return await asyncio.to_thread(self.registry.resolve, model)
        except UnknownModel as exc:
            raise ApiError(404, str(exc), "model", "model_not_found") from None
        except RunUnavailable as exc:  # it failed before and its files have not changed since
            raise self._run_unavailable(exc.run, exc.reason) from None

    async def check_run(self, entry: ModelEntry) -> None:
        """Have Vision load a run's tower and projector on its first request (text-only ones too), so a run with
        broken files fails whatever it is asked; the LanguageModel checks its adapter on every request."""
        if entry.run is None or self.registry.verified(entry):
            return
        reason = await self.vision.check_run.remote(entry.run)
        if reason is not None:
            raise self._run_unavailable(entry, reason)
        self.registry.mark_verified(entry)

    async def chat_completions(self, request: Request) -> Response:
        """Validate, transcribe and encode media concurrently, then answer whole or as server-sent events."""
        timings = RequestTimings(time.perf_counter())
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        chat = parse_chat_request(parse_json_body(await self.read_body(request)), self.settings.limits)
        self.check_prompt_chars(chat.messages)
        entry = await self.resolve_model(chat.model)
        await self._with_deadline(self.check_run(entry), deadline)
        image_size = (await self.model_info())["image_size"]
        parsed = await asyncio.to_thread(self.parse_messages, chat.messages, image_size)
        gen_request = await self._with_deadline(self.encode_media(parsed, chat, entry.run, timings), deadline)
        failed = next((e for e in gen_request.image_embeds if isinstance(e, RunUnavailable)), None)
        if failed is not None:
            raise self._run_unavailable(entry, failed.reason)
        stream = self.lm_stream.generate.remote(gen_request)
        try:
            first = await self._with_deadline(anext(stream), deadline)
            if first.get("code") == "run_unavailable":
                raise self._run_unavailable(entry, first["error"])
            if "error" in first:
                raise bad_request(first["error"], "messages", "context_length_exceeded")
            if chat.stream:
                return StreamingResponse(self.sse(chat, entry.id, stream, first, deadline, timings),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            answer = self.whole_answer(chat, entry.id, stream, first, gen_request, timings)
            return JSONResponse(await self._with_deadline(answer, deadline))
        except BaseException:
            stream.cancel()
            raise

    # -- the chat pipeline --------------------------------------------------------------------------------------

    async def _with_deadline(self, awaitable: Awaitable, deadline: float) -> Any:
        try:
            async with asyncio.timeout_at(deadline):
                return await awaitable
        except TimeoutError:
            raise self._timed_out() from None

    def check_prompt_chars(self, messages: Any) -> None:
        """Refuse text far over the LM's token limit by its length alone (no tokenizer, no media decoded)."""
        limit, chars = self.settings.max_prompt_chars, text_chars(messages)
        if limit and chars > limit:
            raise bad_request(f"the prompt's text is {chars:,} characters, far over the limit of "
                              f"{self.settings.max_prompt_tokens} tokens (text over {limit:,} characters is refused "
                              "before tokenising)", "messages", "context_length_exceeded")

    def parse_messages(self, messages: Any, image_size: int) -> ParsedRequest:
        """Validate messages, decode media (worker thread) and shrink images to what the tower needs."""
        try:
            parsed = parse_messages(messages, self.settings.media, self.fetcher)
        except RequestError as exc:
            raise bad_request(str(exc), exc.param) from None
        parsed.images = [shrink_image(img, image_size) for img in parsed.images]
        return parsed

    async def encode_media(self, parsed: ParsedRequest, chat: ChatRequest, run: RunBundle | None,
                           timings: RequestTimings) -> GenerationRequest:
        """Transcribe every clip and encode every image (with `run`'s tower and projector), all at once; then
        render the turns. `timings` gets how long the clips and the images took."""
        speech_calls = [self.speech.transcribe.remote(a) for a in parsed.audios]
        vision_calls = [self.vision.encode.remote(img, run) for img in parsed.images]
        try:
            (transcripts, timings.transcribe_s), (embeds, timings.encode_s) = await asyncio.gather(
                timed(speech_calls), timed(vision_calls))
        except BaseException:
            for call in speech_calls + vision_calls:
                call.cancel()
            raise
        return GenerationRequest(parsed.turns(transcripts), embeds, chat.params, transcripts, run)

    async def whole_answer(self, chat: ChatRequest, model: str, stream, first: dict, gen_request: GenerationRequest,
                      timings: RequestTimings) -> dict:
        """A whole (non-streaming) answer, from the model id `model`, with its `timings`."""
        text, last = [], {"finish_reason": "stop", "completion_tokens": 0}
        async for item in stream:
            if item["completion_tokens"]:  # a token, even one whose text is not complete yet
                timings.token(time.perf_counter())
            text.append(item["text"])
            last = item
            if item["finish_reason"]:
                break
        body = completion_object(chat.request_id, model, "".join(text), last["finish_reason"],
                                 first["prompt_tokens"], last["completion_tokens"])
        if gen_request.transcripts:
            body["transcripts"] = gen_request.transcripts
        body["timings"] = self.finished(timings, last["completion_tokens"])
        return body

    def finished(self, timings: RequestTimings, completion_tokens: int) -> dict:
        """Record a finished answer's first-token time and decode rate; its timings as the response reports them."""
        timings.finish(completion_tokens, time.perf_counter())
        if timings.first_token_s is not None:
            self.metrics.first_token(timings.first_token_s)
            self.metrics.decode_rate(completion_tokens, timings.decode_s or 0.0)
        return timings.report()

    async def sse(self, chat: ChatRequest, model: str, stream, first: dict, deadline: float,
                  timings: RequestTimings) -> AsyncIterator[bytes]:
        """Server-sent chunks from the model id `model`: the role, the text deltas, the finish reason (with the
        request's `timings`), usage if asked, then [DONE]."""
        rid, created = chat.request_id, int(time.time())
        finished = False
        try:
            yield sse_event(chunk_object(rid, model, created, {"role": "assistant", "content": ""}))
            item = {"completion_tokens": 0}
            while not finished:
                item = await self._with_deadline(anext(stream), deadline)
                if item["completion_tokens"]:
                    timings.token(time.perf_counter())
                if item["text"]:
                    yield sse_event(chunk_object(rid, model, created, {"content": item["text"]}))
                finished = item["finish_reason"] is not None
            last = chunk_object(rid, model, created, {}, item["finish_reason"])
            last["timings"] = self.finished(timings, item["completion_tokens"])
            yield sse_event(last)
            if chat.include_usage:
                usage = usage_object(first["prompt_tokens"], item["completion_tokens"])
                yield sse_event(chunk_object(rid, model, created, usage=usage))
        except (ApiError, StopAsyncIteration) as err:
            message = err.message if isinstance(err, ApiError) else "the answer ended without a finish reason"
            yield sse_event(error_body(message, "server_error", code=getattr(err, "code", None)))
        except self.unavailable_errors:
            log.warning("streaming %s failed: the LanguageModel replica died", rid)
            yield sse_event(self._unavailable().body())
        except Exception:
            log.exception("streaming %s failed", rid)
            yield sse_event(error_body("internal server error while streaming", "server_error"))
        finally:
            if not finished:
                stream.cancel()
        yield SSE_DONE
