"""The OpenAI chat-completions wire format: request validation, response and chunk objects, SSE framing, errors.

No Ray and no web framework here: the serving ingress hands these functions bytes or parsed JSON and sends what
they return. Every refusal is an `ApiError` that renders as OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from trimodal.inference.requests import SamplingParams

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects a request may have (a chat request needs about 6)."""
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 200
UNSUPPORTED_TRUE = ("logprobs", "parallel_tool_calls")
UNSUPPORTED_NON_EMPTY = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "audio", "modalities")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate (\\ud800-\\udfff): a pair is an emoji, a lone one is not Unicode."""


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped JSON body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body: {"error": {"message", "type", "param", "code"}}."""
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 invalid_request_error."""
    return ApiError(400, message, param, code)


@dataclass
class RequestLimits:
    """Bounds on the sampling fields of a request (from `ServingConfig`)."""

    max_tokens_default: int = 128
    max_tokens_limit: int = 1024


@dataclass
class ChatRequest:
    """A validated chat-completions request; `messages` are still raw (see `messages.parse_messages`)."""

    messages: Any
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    request_id: str = field(default_factory=lambda: new_request_id())


def new_request_id() -> str:
    """An id like OpenAI's: chatcmpl-<random>."""
    return "chatcmpl-" + secrets.token_hex(12)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """Request bytes -> a JSON object; 400 for invalid JSON, NaN/Infinity, non-objects and deep nesting."""
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request(f"the JSON body is nested too deeply (limit {max_depth} levels)", code="invalid_json")
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json")
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {_json_type(body)}", code="invalid_json")
    if json_depth(body) > max_depth:
        raise bad_request(f"the JSON body is nested too deeply (limit {max_depth} levels)", code="invalid_json")
    if SURROGATE_ESCAPE.search(raw) and not _is_unicode(body):
        raise bad_request("the JSON body holds a string with an unpaired UTF-16 surrogate escape (\\ud800-\\udfff): "
                          "it is not valid Unicode", code="invalid_json")
    return body


def _is_unicode(body: dict) -> bool:
    """False when a string or key holds a lone surrogate (tokenizers refuse those)."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, `[]` is 1), computed without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {_json_type(value)}", name, "invalid_type")
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise bad_request(f"{name} must be in {bound}, got {value}", name, "invalid_value")
    return float(value)


def _max_tokens(body: dict, limits: RequestLimits) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return limits.max_tokens_default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {_json_type(value)}", name, "invalid_type")
    if not 1 <= value <= limits.max_tokens_limit:
        raise bad_request(f"{name} must be between 1 and {limits.max_tokens_limit}, got {value}", name,
                          "invalid_value")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_request("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(items) > MAX_STOP_STRINGS:
        raise bad_request(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(items)}", "stop",
                          "invalid_value")
    if any(not s or len(s) > MAX_STOP_CHARS for s in items):
        raise bad_request(f"each stop string must have 1 to {MAX_STOP_CHARS} characters", "stop", "invalid_value")
    return tuple(items)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {_json_type(value)}", name, "invalid_type")
    return value


def _seed(body: dict) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"seed must be an integer, got {_json_type(value)}", "seed", "invalid_type")
    return value % (2**63)


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options", "invalid_type")
    return _flag(options, "include_usage")


def _check_unsupported(body: dict) -> None:
    """Refuse features this server does not implement instead of silently ignoring them."""
    if body.get("n") not in (None, 1):
        raise bad_request(f"n must be 1 (one choice per request), got {body.get('n')!r}", "n", "unsupported")
    for name in UNSUPPORTED_TRUE:
        if body.get(name):
            raise bad_request(f"{name} is not supported by this server", name, "unsupported")
    for name in UNSUPPORTED_NON_EMPTY:
        if body.get(name) not in (None, [], {}, "none", "auto"):
            raise bad_request(f"{name} is not supported by this server", name, "unsupported")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise bad_request(f"{name} is not supported by this server (only 0)", name, "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad_request("response_format: only {\"type\": \"text\"} is supported", "response_format",
                          "unsupported")


def parse_chat_request(body: dict, limits: RequestLimits) -> ChatRequest:
    """Validate the non-message fields of a chat-completions request and build its SamplingParams.

    Temperature defaults to 0 (greedy decoding) here, where OpenAI defaults to 1.
    """
    if "messages" not in body:
        raise bad_request("messages is required", "messages", "missing_required_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model", "invalid_type")
    _check_unsupported(body)
    params = SamplingParams(max_tokens=_max_tokens(body, limits),
                            temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                            stop=_stop(body), seed=_seed(body))
    stream, include_usage = _flag(body, "stream"), _include_usage(body)
    return ChatRequest(body["messages"], params, stream, stream and include_usage, model)


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                      completion_tokens: int, created: int | None = None) -> dict:
    """A non-streaming `chat.completion` response."""
    return {"id": request_id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage_object(prompt_tokens, completion_tokens)}


def chunk_object(request_id: str, model: str, created: int, delta: dict | None = None,
                 finish_reason: str | None = None, usage: dict | None = None) -> dict:
    """A `chat.completion.chunk`; with `usage` it is the final usage-only chunk (no choices)."""
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage
    else:
        chunk["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    return chunk


def sse_event(obj: dict) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
"""The terminating event OpenAI streams end with."""


def models_object(models: list[tuple[str, int, dict]]) -> dict:
    """`GET /v1/models`: (id, created, details) per model, the details under `trimodal`."""
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                         "owned_by": "trimodal", "trimodal": details}
                                        for model_id, created, details in models]}
