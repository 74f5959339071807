"""The OpenAI wire format: body parsing, field validation, response/chunk shapes, SSE framing."""

import json

import pytest

from trimodal.inference.openai_api import (SSE_DONE, ApiError, RequestLimits, chunk_object, completion_object,
                                           json_depth, parse_chat_request, parse_json_body, sse_event)

LIMITS = RequestLimits(max_tokens_default=16, max_tokens_limit=100)
MESSAGES = [{"role": "user", "content": "hi"}]


def _request(**fields):
    return parse_chat_request({"messages": MESSAGES, **fields}, LIMITS)


def test_defaults_are_greedy_with_the_default_max_tokens():
    req = _request()
    assert (req.params.max_tokens, req.params.temperature, req.params.top_p, req.params.stop) == (16, 0.0, 1.0, ())
    assert not req.stream and not req.include_usage and req.request_id.startswith("chatcmpl-")


def test_sampling_fields_are_carried_over():
    req = _request(max_tokens=50, temperature=0.7, top_p=0.9, stop="\n", seed=3, stream=True,
                   stream_options={"include_usage": True}, model="x", n=1, presence_penalty=0)
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == (50, 0.7, 0.9, ("\n",), 3)
    assert req.stream and req.include_usage and req.model == "x"
    assert _request(max_completion_tokens=7).params.max_tokens == 7


@pytest.mark.parametrize("fields, param, match", [
    ({"max_tokens": 0}, "max_tokens", "between 1 and 100"),
    ({"max_tokens": 101}, "max_tokens", "between 1 and 100"),
    ({"max_tokens": -5}, "max_tokens", "between 1 and 100"),
    ({"max_tokens": 2.5}, "max_tokens", "must be an integer"),
    ({"max_tokens": True}, "max_tokens", "must be an integer"),
    ({"max_tokens": "10"}, "max_tokens", "must be an integer"),
    ({"max_completion_tokens": 1000}, "max_completion_tokens", "between 1 and 100"),
    ({"temperature": 2.5}, "temperature", r"in \[0.0, 2.0\]"),
    ({"temperature": -0.1}, "temperature", r"in \[0.0, 2.0\]"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"top_p": 0}, "top_p", r"in \(0.0, 1.0\]"),
    ({"top_p": 1.5}, "top_p", r"in \(0.0, 1.0\]"),
    ({"stop": 5}, "stop", "string or a list of strings"),
    ({"stop": ["a", 1]}, "stop", "string or a list of strings"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [""]}, "stop", "1 to 200 characters"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"stream": True, "stream_options": []}, "stream_options", "must be an object"),
    ({"stream_options": "x"}, "stream_options", "must be an object"),
    ({"n": 2}, "n", "n must be 1"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"presence_penalty": 1.0}, "presence_penalty", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "only"),
    ({"seed": "x"}, "seed", "must be an integer"),
    ({"model": 3}, "model", "must be a string"),
])
def test_bad_fields_are_400_naming_the_field(fields, param, match):
    with pytest.raises(ApiError, match=match) as info:
        _request(**fields)
    assert info.value.status == 400 and info.value.param == param
    body = info.value.body()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param


def test_messages_are_required():
    with pytest.raises(ApiError, match="messages is required"):
        parse_chat_request({}, LIMITS)


@pytest.mark.parametrize("raw, match", [
    (b"", "empty"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'{"temperature": NaN, "messages": []}', "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, not an array"),
    (b'"text"', "not a string"),
    (b"[" * 40 + b"]" * 40, "must be a JSON object"),
    (b'{"a":' + b"[" * 40 + b"]" * 40 + b"}", "nested too deeply"),
    (b'{"a":' + b"[" * 200000 + b"]" * 200000 + b"}", "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "caf\\ud800 au lait"}]}', "unpaired UTF-16 surrogate"),
    (b'{"messages": [], "\\udfff": 1}', "unpaired UTF-16 surrogate"),
])
def test_bad_bodies_are_400(raw, match):
    with pytest.raises(ApiError, match=match) as info:
        parse_json_body(raw)
    assert info.value.status == 400 and info.value.code == "invalid_json"


def test_surrogate_pairs_and_escaped_backslashes_are_fine():
    emoji = parse_json_body(b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00 \\\\ud800"}]}')
    assert emoji["messages"][0]["content"] == "\U0001F600 \\ud800"


def test_json_depth_counts_containers_without_recursion():
    assert json_depth(1) == 0 and json_depth([]) == 1 and json_depth({"a": [{"b": []}]}) == 4
    deep = []
    for _ in range(100000):
        deep = [deep]
    assert json_depth(deep) == 100001


def test_response_and_chunk_shapes():
    body = completion_object("chatcmpl-1", "m", "Hello", "stop", 10, 2, created=5)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant",
                                                                                       "content": "Hello"}
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    chunk = chunk_object("chatcmpl-1", "m", 5, {"content": "He"})
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"] == {"content": "He"}
    assert chunk["choices"][0]["finish_reason"] is None
    usage = chunk_object("chatcmpl-1", "m", 5, usage={"prompt_tokens": 1})
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 1}


def test_sse_framing():
    event = sse_event({"a": "é"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:]) == {"a": "é"}
    assert SSE_DONE == b"data: [DONE]\n\n"
