"""The bad requests the endpoint must refuse, with the status and a fragment of the message that proves which check
refused each, shared by the live test (tests/integration/test_serve.py sends them to a deployed server) and the
in-process one (tests/unit/test_serve_protocol.py checks them without a server). Plain data and PIL only: no torch, no
Ray."""
from __future__ import annotations

import base64
import io
import json
import random

from PIL import Image

MODEL = "tiny-llava"
LIMITS = dict(max_tokens_limit=32, max_images=2, max_image_bytes=30_000, max_image_pixels=300 * 300,
              max_body_bytes=200_000, max_prompt_chars=60_000, body_read_timeout_s=2.0)
FETCH_TIMEOUT_S = 1.0
# The endpoint fetches http(s) image URLs from 127.0.0.1 only: the tests' own image host.
IMAGE_URLS = dict(image_url_hosts=["127.0.0.1"], allow_private_image_hosts=True, image_fetch_timeout_s=FETCH_TIMEOUT_S)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def wide_image(colour=(200, 30, 30)) -> Image.Image:
    """Not square: the tiny model answers differently when the image is not padded the way training did."""
    image = Image.new("RGB", (48, 24), (20, 20, 20))
    image.paste(Image.new("RGB", (16, 12), colour), (8, 6))
    return image


def bomb_png() -> bytes:
    """A decompression bomb: 64 million pixels of one colour that deflate to a few kilobytes."""
    return png_bytes(Image.new("1", (8000, 8000)))


def noise_png(side: int) -> bytes:
    """Noise does not compress: a PNG of about 3 bytes per pixel."""
    return png_bytes(Image.frombytes("RGB", (side, side), random.Random(0).randbytes(side * side * 3)))


def good_body(**changes) -> dict:
    body = {"model": MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"},
                                                      image_part(png_bytes(wide_image()))]}]}
    return {**body, **changes}


def with_content(*parts) -> dict:
    return good_body(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi?"}, *parts]}])


def image_url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


GOOD_PNG = png_bytes(wide_image())
BOMB = bomb_png()

LONG_TEXT = "red square " * 3000  # about 6000 tokens, the tiny model's context is Vicuna's 4096
ASSISTANT_IMAGE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [image_part(GOOD_PNG)]},
                   {"role": "user", "content": "And?"}]

# case -> (body, status, a fragment of the message that proves the intended check refused it)
BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tiny-llava", "messages": [', 400, "not valid JSON"),
    "body not an object": ([1, 2], 400, "JSON object"),
    "messages not a list": (good_body(messages="hello"), 400, "non-empty array"),
    "empty messages": (good_body(messages=[]), 400, "non-empty array"),
    "message not an object": (good_body(messages=["hello"]), 400, "must be an object"),
    "unknown role": (good_body(messages=[{"role": "robot", "content": "hi"}]), 400, "unknown role"),
    "content of wrong type": (good_body(messages=[{"role": "user", "content": 5}]), 400, "string or an array"),
    "text part not a string": (with_content({"type": "text", "text": 5}), 400, ".text must be a string"),
    "unknown part type": (with_content({"type": "input_audio"}), 400, "unknown content part type"),
    "image_url not an object": (with_content({"type": "image_url", "image_url": 5}), 400, "must be an object"),
    "http image url of a host not allowed": (with_content(image_url_part("https://example.com/cat.png")), 400,
                                             "'example.com' is not allowed"),
    "ftp image url": (with_content(image_url_part("ftp://127.0.0.1/cat.png")), 400, "data:image"),
    "not a data url": (with_content(image_url_part("cat.png")), 400, "data:image"),
    "bad base64": (with_content(image_url_part("data:image/png;base64,@@not-base64@@")), 400, "not valid base64"),
    "empty image": (with_content(image_url_part("data:image/png;base64,")), 400, "empty"),
    "bytes not an image": (with_content(image_part(b"just some text, not a picture")), 400, "not an image"),
    "truncated image": (with_content(image_part(GOOD_PNG[: len(GOOD_PNG) // 2])), 400, "truncated"),
    "image over the byte limit": (with_content(image_part(noise_png(120))), 400, "30000 bytes"),
    "image over the pixel limit": (with_content(image_part(png_bytes(Image.new("RGB", (400, 400))))), 400,
                                   "too many pixels"),
    "decompression bomb": (with_content(image_part(BOMB)), 400, "too many pixels"),
    "too many images": (with_content(*[image_part(GOOD_PNG)] * (LIMITS["max_images"] + 1)), 400, "too many images"),
    "image in an assistant turn": (good_body(messages=ASSISTANT_IMAGE), 400, "only accepted in user messages"),
    "typed image token": (good_body(messages=[{"role": "user", "content": "look: <image>"}]), 400, "<image>"),
    "last message not from the user": (good_body(messages=[{"role": "assistant", "content": "Hi"}]), 400, "last"),
    "max_tokens zero": (good_body(max_tokens=0), 400, "max_tokens"),
    "max_tokens over the limit": (good_body(max_tokens=LIMITS["max_tokens_limit"] + 1), 400, "limit of 32"),
    "max_tokens a string": (good_body(max_tokens="2"), 400, "max_tokens"),
    "max_tokens negative": (good_body(max_tokens=-3), 400, "max_tokens must be a positive integer"),
    "max_completion_tokens negative": (good_body(max_completion_tokens=-1), 400, "max_completion_tokens"),
    "temperature a string": (good_body(temperature="hot"), 400, "temperature"),
    "temperature too high": (good_body(temperature=3), 400, "between 0 and 2"),
    "top_p zero": (good_body(top_p=0), 400, "top_p"),
    "stop not strings": (good_body(stop=[1]), 400, "stop"),
    "seed a float": (good_body(seed=1.5), 400, "seed"),
    "seed over 64 bits": (good_body(seed=2**70), 400, "seed"),
    "n above one": (good_body(n=2), 400, "n=1"),
    "stream not a boolean": (good_body(stream="yes"), 400, "stream must be a boolean"),
    "stream_options not an object": (good_body(stream=True, stream_options=[1]), 400, "stream_options must be"),
    "stream_options without stream": (good_body(stream_options={"include_usage": True}), 400, "only allowed"),
    "prompt longer than the context": (good_body(messages=[{"role": "user", "content": LONG_TEXT}]), 400, "context"),
    "model missing": ({k: v for k, v in good_body().items() if k != "model"}, 400, "model is required"),
    "unknown model": (good_body(model="gpt-4o"), 404, f"does not exist. This endpoint serves `{MODEL}`"),
    # Each of these was a 500 before: the parser's stack, Python's int limit, UTF-8 encoding, float32 sampling.
    "JSON nested 5,000 deep": (b'{"model": "tiny-llava", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400,
                               "nested too deeply"),
    "integer literal of 5,000 digits": (b'{"model": "tiny-llava", "seed": ' + b"7" * 5000 + b"}", 400, "5000 digits"),
    "lone surrogate in the text": (json.dumps(good_body(messages=[{"role": "user", "content": "hi \ud800"}])).encode(),
                                   400, "lone UTF-16 surrogate"),
    "lone surrogate in the model name": (b'{"model": "\\udfff", "messages": []}', 400, "lone UTF-16 surrogate"),
    "top_p 1e-300": (good_body(top_p=1e-300), 400, "top_p must be greater than 0"),
    "NaN temperature": (b'{"model": "tiny-llava", "temperature": NaN}', 400, "not JSON"),
    "a 1 x 10,000 image": (with_content(image_part(png_bytes(Image.new("RGB", (1, 10_000))))), 400,
                           "longer than the limit"),
    "a 2 x 300 image": (with_content(image_part(png_bytes(Image.new("RGB", (2, 300))))), 400, "aspect ratio 150.0"),
    "prompt over the character limit": (good_body(messages=[{"role": "user", "content": "y" * 60_001}]), 400,
                                        "60001 characters"),
    "tools asked for": (good_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tool calling"),
    "invalid UTF-8 in the body": (b'{"model": "tiny-\xff"}', 400, "not valid JSON"),
}
