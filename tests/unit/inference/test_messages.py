import base64
import io

import pytest
from PIL import Image

from trimodal.inference.messages import MediaLimits, RequestError, decode_image, parse_messages, text_chars
from trimodal.models.chat import IMAGE_MARKER


def _png(w=8, h=8, color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def test_string_and_part_contents_render_images_first():
    req = parse_messages([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, _image_part(_png())]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "And its colour?"},
    ], MediaLimits())
    turns = req.turns([])
    assert [t.role for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[1].text == IMAGE_MARKER + "What is this?"
    assert len(req.images) == 1 and req.images[0].size == (8, 8)


def test_user_typed_image_marker_cannot_create_image_positions():
    req = parse_messages([{"role": "user", "content": "<image> hi"}], MediaLimits())
    assert IMAGE_MARKER not in req.turns([])[0].text


@pytest.mark.parametrize("messages, match, param", [
    ([], "non-empty list", "messages"),
    ([{"role": "user", "content": ""}], "content is empty", "messages[0].content"),
    ([{"role": "robot", "content": "x"}], "role", "messages[0].role"),
    ([{"role": "user", "content": [{"type": "video"}]}], "unknown content part type 'video'", "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}],
     "invalid base64", "messages[0].content[0]"),
    ([{"role": "user", "content": [_image_part(b"not an image at all")]}], "not a readable image",
     "messages[0].content[0]"),
    ([{"role": "user", "content": [_image_part(_png()[:40])]}], "not a readable image", "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/a.png"}}]}],
     "remote image URLs are refused", "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aac"}}]}],
     "format 'aac' is not one of", "messages[0].content[0]"),
    ([{"role": "assistant", "content": "only me"}], "at least one user message", "messages"),
])
def test_bad_requests_name_the_problem(messages, match, param):
    with pytest.raises(RequestError, match=match) as info:
        parse_messages(messages, MediaLimits())
    assert info.value.param == param


def test_pixel_limit_is_checked_before_decoding():
    big = _png(300, 200)
    with pytest.raises(RequestError, match="300x200 = 60000 pixels, over the limit of 50000"):
        decode_image(big, max_pixels=50_000)
    assert decode_image(big, max_pixels=60_000).size == (300, 200)


def test_too_many_images():
    parts = [_image_part(_png())] * 3
    with pytest.raises(RequestError, match="at most 2"):
        parse_messages([{"role": "user", "content": parts}], MediaLimits(max_images=2))


def _saved(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_a_crafted_file_whose_decoder_raises_an_unexpected_error_is_a_request_error():
    dds = bytearray(_saved(Image.new("RGB", (4, 4)), "DDS"))
    dds[80:84] = b"\0\0\0\0"  # pixel format flags 0: Pillow's DDS plugin raised NotImplementedError (a 500)
    with pytest.raises(RequestError, match="not a readable image"):
        decode_image(bytes(dds), max_pixels=1 << 20)


@pytest.mark.parametrize("fmt", ["DDS", "TGA", "PCX", "SGI", "ICO"])
def test_formats_outside_the_allow_list_are_refused_unopened(fmt):
    data = _saved(Image.new("RGB", (16, 16), (1, 2, 3)), fmt)
    with pytest.raises(RequestError, match="not a readable image in one of PNG, JPEG"):
        decode_image(data, max_pixels=1 << 20)


@pytest.mark.parametrize("fmt, mode", [("PNG", "I;16"), ("TIFF", "F"), ("TIFF", "I"), ("TIFF", "CMYK"),
                                       ("WEBP", "RGBA"), ("GIF", "P"), ("BMP", "1"), ("JPEG", "L")])
def test_allowed_formats_in_any_mode_decode_to_rgb(fmt, mode):
    image = decode_image(_saved(Image.new(mode, (9, 7)), fmt), max_pixels=1 << 20)
    assert image.mode == "RGB" and image.size == (9, 7)


def test_text_chars_counts_the_prompt_text_only_and_tolerates_anything():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}}
    messages = [{"role": "system", "content": "  brief  "},
                {"role": "user", "content": [image, {"type": "text", "text": "abc"}, {"type": "text", "text": 5}]},
                {"role": "user", "content": None}, "not a message", {"content": ["odd part"]}]
    assert text_chars(messages) == len("brief") + len("abc")
    assert text_chars("not a list") == 0 and text_chars([]) == 0
