"""Malformed and hostile media for the bad-input sweep: hand-built PNG bombs, WAV headers, a long silent OGG."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import soundfile as sf
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png(w: int, h: int, color=(200, 40, 40)) -> bytes:
    """A solid RGB PNG."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    """`image` saved in `fmt`."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def zeros_deflated(n: int, block: int = 1 << 22) -> bytes:
    """zlib stream of `n` zero bytes (compressed block by block: no n-byte buffer is built)."""
    comp, zero, out = zlib.compressobj(9), bytes(block), []
    for start in range(0, n, block):
        out.append(comp.compress(zero[: min(block, n - start)]))
    out.append(comp.flush())
    return b"".join(out)


def png_bomb(w: int, h: int) -> bytes:
    """A 1-bit greyscale PNG of w x h zero pixels: tiny on the wire, w*h pixels when decoded."""
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    rows = h * (1 + (w + 7) // 8)  # each row: a filter byte + packed bits
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zeros_deflated(rows)) + chunk(b"IEND", b"")


def png_with_chunk(kind: bytes, payload: bytes, w: int = 32, h: int = 32) -> bytes:
    """A valid small PNG with one extra chunk inserted right after IHDR."""
    data = png(w, h)
    end_of_ihdr = len(PNG_SIGNATURE) + 8 + 13 + 4
    return data[:end_of_ihdr] + chunk(kind, payload) + data[end_of_ihdr:]


def png_idat_bomb(inflated: int = 200 << 20) -> bytes:
    """An 8x8 greyscale PNG whose IDAT stream inflates to `inflated` bytes (far past the 8 rows it needs)."""
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zeros_deflated(inflated)) + chunk(b"IEND", b"")


def gif_with_screen(w: int, h: int) -> bytes:
    """A 1x1 GIF whose logical screen claims w x h."""
    data = bytearray(encoded(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", w, h)
    return bytes(data)


def jpeg_with_size(w: int, h: int) -> bytes:
    """A 16x16 JPEG whose frame header (SOF0) claims w x h."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def wav(seconds: float, rate: int = 16000, channels: int = 1, value: float = 0.1) -> bytes:
    """A constant-valued PCM WAV (value NaN gives a float WAV of NaNs)."""
    frames = np.full((int(seconds * rate), channels), value, np.float32)
    buf = io.BytesIO()
    sf.write(buf, frames, rate, format="WAV", subtype="FLOAT" if np.isnan(value) else "PCM_16")
    return buf.getvalue()


def wav_header(rate: int, channels: int, frames: int = 160) -> bytes:
    """A hand-made 16-bit PCM WAV with any sample rate and channel count (libsndfile writes only sane ones)."""
    data = bytes(2 * channels * frames)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def silent_ogg(seconds: float, rate: int = 1000) -> bytes:
    """Silence as OGG/Vorbis, a minute at a time; 1 kHz (the lowest rate the server takes) encodes 2 hours in 0.4 s."""
    buf, minute = io.BytesIO(), np.zeros(rate * 60, np.float32)
    with sf.SoundFile(buf, mode="w", samplerate=rate, channels=1, format="OGG", subtype="VORBIS") as out:
        for _ in range(int(seconds // 60)):
            out.write(minute)
    return buf.getvalue()
