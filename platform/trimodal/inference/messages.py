"""OpenAI-style chat messages -> turns, decoded images and decoded audio, with clear errors for bad input.

Content is a string or a list of parts: {"type": "text"}, {"type": "image_url", "image_url": {"url": ...}},
{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}. In a user message the images
come first, then the audio transcripts, then the typed text (the order the capstone recipe this platform grew
from built its prompts in; see README.md, "What it is").
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from trimodal.models.chat import IMAGE_MARKER, Turn, escape_markers

ROLES = ("system", "developer", "user", "assistant")
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


class RequestError(ValueError):
    """The request is malformed; `param` names the offending field (OpenAI error shape)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class MediaLimits:
    """Limits on decoded media."""

    max_image_pixels: int = 4096 * 4096
    """Largest width x height."""
    max_images: int = 4
    """Images per request."""
    max_audio_seconds: float = 120.0
    """Longest audio after decoding."""


@dataclass
class UserContent:
    """One message before transcription: its images, audios and text, in that order."""

    role: str
    text: str
    n_images: int = 0
    audio_indices: list[int] = field(default_factory=list)


@dataclass
class ParsedRequest:
    """Messages with media decoded; `turns(transcripts)` renders the final turns."""

    contents: list[UserContent]
    images: list[Image.Image]
    audios: list[np.ndarray]

    def turns(self, transcripts: list[str]) -> list[Turn]:
        """Render turns once the audio clips have transcripts (in `audios` order)."""
        out = []
        for c in self.contents:
            words = [transcripts[i] for i in c.audio_indices if transcripts[i]] + ([c.text] if c.text else [])
            out.append(Turn(c.role, IMAGE_MARKER * c.n_images + " ".join(words)))
        return out


def decode_base64(data: Any, param: str) -> bytes:
    """Strict base64 -> bytes."""
    if not isinstance(data, str) or not data:
        raise RequestError("expected a non-empty base64 string", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("invalid base64 data", param)


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow formats a request's image may be in (JPEG includes camera MPO files). Others are refused unopened:
Pillow's rarer decoders raise errors of any type on crafted files, and EPS runs Ghostscript where installed."""


def decode_image(data: bytes, max_pixels: int, param: str = "image") -> Image.Image:
    """Bytes -> RGB PIL image; refuses non-images, other formats, truncated files and images over `max_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise RequestError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}", param)
            img.load()
            if w < 1 or h < 1:
                raise RequestError("image has no pixels", param)
            return img.convert("RGB")
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(f"image refused as a decompression bomb: {exc}", param)
    except Image.UnidentifiedImageError:
        raise RequestError(f"image data is not a readable image in one of {', '.join(IMAGE_FORMATS)}", param)
    except Exception as exc:  # noqa: BLE001 - a crafted file can make a decoder raise anything; none is a 500
        raise RequestError(f"image data is not a readable image ({type(exc).__name__}: {exc})", param)


def image_from_url(url: Any, limits: MediaLimits, param: str,
                   fetch_url: Callable[[str], bytes] | None) -> Image.Image:
    """A data: URL (base64) or, where a fetcher is configured, a remote URL -> image."""
    if not isinstance(url, str) or not url:
        raise RequestError("image_url.url must be a non-empty string", param)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise RequestError("data: URLs must be base64 encoded (data:image/png;base64,...)", param)
        return decode_image(decode_base64(payload, param), limits.max_image_pixels, param)
    if fetch_url is None:
        raise RequestError("remote image URLs are refused; send a data: URL (or configure allowed media domains)",
                           param)
    return decode_image(fetch_url(url), limits.max_image_pixels, param)


def _audio_part(part: dict, param: str, limits: MediaLimits) -> np.ndarray:
    audio = part.get("input_audio")
    if not isinstance(audio, dict):
        raise RequestError("input_audio must be an object with data and format", param)
    fmt = audio.get("format")
    if fmt not in AUDIO_FORMATS:
        raise RequestError(f"input_audio.format {fmt!r} is not one of {', '.join(AUDIO_FORMATS)}", param)
    raw = decode_base64(audio.get("data"), f"{param}.data")
    from trimodal.audio import AudioError, decode_audio

    try:
        return decode_audio(raw, max_seconds=limits.max_audio_seconds)
    except AudioError as exc:
        raise RequestError(f"audio: {exc}", param)


def _parse_parts(parts: list, param: str, limits: MediaLimits, req: ParsedRequest,
                 fetch_url: Callable[[str], bytes] | None) -> UserContent:
    content = UserContent(role="user", text="")
    texts = []
    for k, part in enumerate(parts):
        p = f"{param}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError("text part needs a string 'text'", p)
            texts.append(part["text"])
        elif kind == "image_url":
            if len(req.images) >= limits.max_images:
                raise RequestError(f"too many images: at most {limits.max_images} per request", p)
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            req.images.append(image_from_url(url, limits, p, fetch_url))
            content.n_images += 1
        elif kind == "input_audio":
            req.audios.append(_audio_part(part, p, limits))
            content.audio_indices.append(len(req.audios) - 1)
        else:
            raise RequestError(f"unknown content part type {kind!r} (allowed: text, image_url, input_audio)", p)
    content.text = escape_markers(" ".join(t.strip() for t in texts if t.strip()))
    return content


def text_chars(messages: Any) -> int:
    """Characters of text the messages would put in the prompt (string contents and text parts, stripped).

    Cheap and tolerant: anything malformed counts 0 here and is refused by `parse_messages`.
    """
    total = 0
    for msg in messages if isinstance(messages, list) else ():
        body = msg.get("content") if isinstance(msg, dict) else None
        parts = body if isinstance(body, list) else [{"type": "text", "text": body}]
        for part in parts:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            total += len(text.strip()) if isinstance(text, str) else 0
    return total


def parse_messages(messages: Any, limits: MediaLimits,
                   fetch_url: Callable[[str], bytes] | None = None) -> ParsedRequest:
    """Validate OpenAI-style messages and decode their media."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    req = ParsedRequest(contents=[], images=[], audios=[])
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise RequestError(f"each message needs a role in {', '.join(ROLES)}", f"{param}.role")
        role = "system" if msg["role"] == "developer" else msg["role"]
        body = msg.get("content")
        if isinstance(body, str):
            content = UserContent(role=role, text=escape_markers(body.strip()))
        elif isinstance(body, list):
            content = _parse_parts(body, f"{param}.content", limits, req, fetch_url)
            content.role = role
        else:
            raise RequestError("content must be a string or a list of parts", f"{param}.content")
        if role != "user" and (content.n_images or content.audio_indices):
            raise RequestError("only user messages may carry images or audio", f"{param}.content")
        if not (content.text or content.n_images or content.audio_indices):
            raise RequestError("message content is empty", f"{param}.content")
        req.contents.append(content)
    if not any(c.role == "user" for c in req.contents):
        raise RequestError("at least one user message is needed", "messages")
    return req
