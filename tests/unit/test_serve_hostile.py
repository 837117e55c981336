"""Hostile and careless requests, checked in-process: the body parser, the request checks, the image limits, the token
sampler and the engine's per-request failure isolation. Each case asserts the exact status and a fragment of the message
that proves which check refused it. (tests/integration/test_serve.py sends the protocol-level cases to a live
server.)"""
from __future__ import annotations

import base64
import io
import json
import threading

import pytest
import torch
from PIL import Image

from llava_core.config import ServeSettings
from llava_core.data.formats import RowError
from llava_core.data.images import ImageLimits, decode_image
from llava_core.inference import token_sampler
from llava_core.inference.decoding import DecodingParams
from llava_core.serve import json_body, protocol
from llava_core.serve.errors import ApiError
from llava_core.serve.media import decode_media

MODEL = "tiny-llava"
SETTINGS = ServeSettings(max_images=2, max_image_bytes=200_000, max_image_pixels=300 * 300, max_image_side=1000,
                         max_image_aspect_ratio=20, max_prompt_chars=5_000, max_tokens_limit=32)


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def body(*parts, **changes) -> dict:
    content = [{"type": "text", "text": "What is it?"}, *parts]
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": content}], **changes}


def checked(request: dict, settings: ServeSettings = SETTINGS, takes_videos: bool = False):
    """What the replica does before it counts tokens: check the body, then decode its images and videos."""
    chat = protocol.parse_chat_request(request, settings, MODEL, takes_videos)
    return chat, *decode_media(chat, settings)


def refusal(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


# case -> (raw body bytes, message fragment)
HOSTILE_BODIES = {
    "nested 5,000 deep": (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    "nested 33 deep, just over": (b'{"model": ' + b"[" * 33 + b"]" * 33 + b"}", "nested too deeply"),
    "objects nested 2,000 deep": (b'{"a":' * 2000 + b"1" + b"}" * 2000, "nested too deeply"),
    "integer of 5,000 digits": (b'{"seed": ' + b"9" * 5000 + b"}", "5000 digits"),
    "float of 5,000 digits": (b'{"top_p": 0.' + b"1" * 5000 + b"}", "5002 characters"),
    "float overflowing to inf": (b'{"temperature": 1e999}', "out of range"),
    "NaN": (b'{"temperature": NaN}', "NaN, which is not JSON"),
    "Infinity": (b'{"top_p": Infinity}', "Infinity, which is not JSON"),
    "-Infinity": (b'{"top_p": -Infinity}', "-Infinity, which is not JSON"),
    "lone surrogate in text": (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "lone UTF-16 surrogate"),
    "lone surrogate in the model name": (b'{"model": "\\udfff"}', "lone UTF-16 surrogate"),
    "lone surrogate in a key": (b'{"\\udc00": 1}', "lone UTF-16 surrogate"),
    "invalid UTF-8": (b'{"model": "\xff\xfe"}', "not valid JSON"),
    "overlong UTF-8 encoding of /": (b'{"model": "\xc0\xaf"}', "not valid JSON"),
    "UTF-8 encoded surrogate": (b'{"model": "\xed\xa0\x80"}', "lone UTF-16 surrogate"),  # json reads surrogatepass
    "truncated body": (b'{"model": "tiny-llava", "messages": [', "not valid JSON"),
    "empty body": (b"", "not valid JSON"),
    "two documents": (b"{} {}", "not valid JSON"),
    "trailing comma": (b'{"model": "x",}', "not valid JSON"),
    "single quotes": (b"{'model': 'x'}", "not valid JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE_BODIES))
def test_hostile_body_is_a_400(case):
    data, fragment = HOSTILE_BODIES[case]
    error = refusal(lambda: json_body.parse_json_body(data))
    assert error.status == 400 and fragment in error.message, error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_valid_unicode_survives_the_body_checks():
    text = "caf\u00e9 \U0001F600 \u4e2d\u6587 \u0000"  # an escaped surrogate pair is one valid character
    data = json.dumps({"t": text, "pair": "\\ud83d\\ude00"}).encode().replace(b"\\\\ud83d\\\\ude00", b"\\ud83d\\ude00")
    parsed = json_body.parse_json_body(data)
    assert parsed == {"t": text, "pair": "\U0001F600"}
    # UTF-16 bodies are JSON too (RFC 8259 readers may accept them); the content is what counts.
    assert json_body.parse_json_body(json.dumps({"a": [1, 2.5]}).encode("utf-16")) == {"a": [1, 2.5]}


def long_and_thin(width: int, height: int) -> bytes:
    return encoded(Image.new("RGB", (width, height), (200, 0, 0)))


PNG = encoded(Image.new("RGB", (48, 24), (20, 20, 20)))

# case -> (request body, param, code, message fragment)
BAD_CHATS = {
    "top_p 1e-300, zero in float32": (body(top_p=1e-300), "top_p", None, "greater than 0"),
    "top_p 1e-46, zero in float32": (body(top_p=1e-46), "top_p", None, "greater than 0"),
    "temperature negative": (body(temperature=-0.5), "temperature", None, "between 0 and 2"),
    "temperature a boolean": (body(temperature=True), "temperature", None, "must be a number"),
    "top_p above 1": (body(top_p=1.5), "top_p", None, "between 0 and 1"),
    "max_tokens a float": (body(max_tokens=2.0), "max_tokens", None, "positive integer"),
    "max_tokens a boolean": (body(max_tokens=True), "max_tokens", None, "positive integer"),
    "seed negative beyond 64 bits": (body(seed=-2**64), "seed", None, "64-bit"),
    "stop of five strings": (body(stop=["a", "b", "c", "d", "e"]), "stop", None, "at most 4"),
    "n zero": (body(n=0), "n", None, "n=1"),
    "tools": (body(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", None, "tool calling"),
    "logprobs": (body(logprobs=True), "logprobs", None, "logprobs is not supported"),
    "response_format json": (body(response_format={"type": "json_object"}), "response_format", None, "text"),
    "prompt of 8 MB": (body(messages=[{"role": "user", "content": "x" * 8_000_000}]), "messages",
                       "context_length_exceeded", "8000000 characters"),
    "prompt over the limit in parts": (body(*[{"type": "text", "text": "y" * 2_000}] * 3), "messages",
                                       "context_length_exceeded", "over this server's limit of 5000"),
    "image 1 x 10,000": (body(image_part(long_and_thin(1, 10_000))), "messages[0].content[1].image_url",
                         "image_too_large", "longer than the limit of 1000"),
    "image 1 x 900": (body(image_part(long_and_thin(1, 900))), "messages[0].content[1].image_url",
                      "invalid_image", "aspect ratio 900.0"),
    "image 10,000 x 2, wide": (body(image_part(long_and_thin(10_000, 2))), "messages[0].content[1].image_url",
                               "image_too_large", "longer than the limit of 1000"),
    "image 30 x 900, over the aspect ratio": (body(image_part(long_and_thin(30, 900))),
                                              "messages[0].content[1].image_url", "invalid_image", "aspect ratio 30.0"),
    "image with a zero side in its header": (body(image_part(PNG[:16] + b"\0\0\0\0" + PNG[20:])),
                                             "messages[0].content[1].image_url", "invalid_image", None),
    "svg is not a raster image": (body(image_part(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")),
                                  "messages[0].content[1].image_url", "invalid_image", "not an image"),
    "data URL of text": (body(image_part(PNG, "text/plain")), "messages[0].content[1].image_url",
                         "invalid_image_url", "not an image type"),
    "file:// image URL": (body({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}),
                          "messages[0].content[1].image_url", "invalid_image_url", "data:image"),
    "gopher image URL": (body({"type": "image_url", "image_url": {"url": "gopher://127.0.0.1/x"}}),
                         "messages[0].content[1].image_url", "invalid_image_url", None),
    "http URL of a host not allowed": (body({"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}),
                                       "messages[0].content[1].image_url", "image_host_not_allowed", None),
    "image_url as a bare string": (body({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}),
                                   "messages[0].content[1].image_url", None, "string url"),
    "three images, limit two": (body(*[image_part(PNG)] * 3), "messages", "too_many_images", "too many images"),
    "image in a system message": (body(messages=[{"role": "system", "content": [image_part(PNG)]},
                                                 {"role": "user", "content": "hi"}]),
                                  "messages[0].content[0]", None, "only accepted in user messages"),
    "role missing": (body(messages=[{"content": "hi"}]), "messages[0].role", None, "unknown role"),
    "model a list": (body(model=["tiny-llava"]), "model", None, "must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_bad_chat_request_is_a_400_naming_its_field(case):
    request, param, code, fragment = BAD_CHATS[case]
    error = refusal(lambda: checked(request))
    assert (error.status, error.param) == (400, param), error.message
    assert code is None or error.code == code, error.code
    assert fragment is None or fragment in error.message, error.message


def test_limits_are_read_from_the_header_before_any_pixel_is_decoded(monkeypatch):
    # An image whose pixel data is missing entirely: if the side or shape limit let it through, decoding would say
    # "truncated"; refused from the header, it never gets that far.
    header_only = long_and_thin(1, 100_000)[:64]
    with pytest.raises(RowError) as caught:
        decode_image(header_only, ImageLimits(max_side=200_000, max_aspect_ratio=20))
    assert caught.value.reason == "image_aspect_ratio"
    with pytest.raises(RowError) as caught:
        decode_image(header_only, ImageLimits(max_side=8192, max_aspect_ratio=1e9))
    assert caught.value.reason == "image_too_large" and "8192" in caught.value.detail


IMAGE_FORMATS = {
    "animated GIF (first frame)": lambda: encoded(Image.new("P", (30, 20), 3), "GIF", save_all=True,
                                                  append_images=[Image.new("P", (30, 20), 5)]),
    "CMYK JPEG": lambda: encoded(Image.new("CMYK", (30, 20), (0, 255, 0, 0)), "JPEG"),
    "16-bit grey PNG": lambda: encoded(Image.new("I;16", (30, 20), 40000), "PNG"),
    "palette PNG with transparency": lambda: encoded(Image.new("P", (30, 20), 1), "PNG", transparency=1),
    "RGBA WebP": lambda: encoded(Image.new("RGBA", (30, 20), (1, 2, 3, 4)), "WEBP"),
    "1-bit TIFF": lambda: encoded(Image.new("1", (30, 20), 1), "TIFF"),
}


@pytest.mark.parametrize("case", list(IMAGE_FORMATS))
def test_odd_but_valid_image_formats_decode_to_rgb(case):
    _, (image,), _ = checked(body(image_part(IMAGE_FORMATS[case]())))
    assert (image.mode, image.size) == ("RGB", (30, 20))


def test_exif_rotation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the picture is 20 wide and 30 high as seen
    data = encoded(Image.new("RGB", (30, 20), (9, 9, 9)), "JPEG", exif=exif)
    _, (image,), _ = checked(body(image_part(data, "image/jpeg")))
    assert image.size == (20, 30)


def test_a_tiny_top_p_keeps_the_most_likely_token():
    probs = torch.softmax(torch.tensor([1.0, 3.0, 2.0, -1.0]), dim=-1)
    kept = token_sampler.nucleus(probs, 1e-300)
    assert kept.tolist() == [0.0, 1.0, 0.0, 0.0]
    generator = token_sampler.new_generator(0)
    assert token_sampler.draw(torch.tensor([1.0, 3.0, 2.0]), 1.0, 1e-30, generator) == 1


def test_a_row_whose_draw_fails_is_recorded_and_the_others_are_drawn():
    params = [DecodingParams(4, temperature=1.0, seed=1), DecodingParams(4, temperature=0.7, seed=2)]
    sampler = token_sampler.PerRequestSampler(params)
    scores = torch.tensor([[float("-inf")] * 5, [0.0, 5.0, 0.0, 0.0, 0.0]])  # row 0 has no possible token
    out = sampler(torch.zeros(2, 1, dtype=torch.long), scores)
    assert list(sampler.failures) == [0] and isinstance(sampler.failures[0], FloatingPointError)
    assert torch.isfinite(out[1]).sum() == 1  # row 1 drew its token as usual


# ---- the engine: one request's failure is its own ----

@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    from llava_core.inference.engine import GenerationEngine

    return GenerationEngine(tiny_llava_dir, device="cpu")


def requests_for(texts: list[str], temperature: float = 0.0):
    from llava_core.inference.engine import GenerationRequest

    return [GenerationRequest([{"role": "user", "content": text}], [], DecodingParams(5, temperature=temperature))
            for text in texts]


def outcomes(engine, requests) -> list:
    """Per request: its answer text, or the error it ended with."""
    events: list[list] = [[] for _ in requests]
    engine.run_batch(requests, lambda step: [events[i].append(e) for i, e in enumerate(step) if e is not None])
    return [row[-1].error if row[-1].error is not None else "".join(e.delta for e in row) for row in events]


TEXTS = ["What is red?", "Tell me a colour", "Which shape?", "Say something long please", "Hi"]


@pytest.fixture(scope="module")
def alone(engine):
    return [outcomes(engine, requests_for([text]))[0] for text in TEXTS]


def test_a_request_whose_sampling_fails_fails_alone(engine, alone, monkeypatch):
    real_draw = token_sampler.draw

    def draw(logits, temperature, top_p, generator):  # the failure a bad parameter would cause, on row 2 only
        if temperature == 0.77:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_draw(logits, temperature, top_p, generator)

    monkeypatch.setattr(token_sampler, "draw", draw)
    requests = requests_for(TEXTS)
    requests[2] = requests_for([TEXTS[2]], temperature=0.77)[0]
    result = outcomes(engine, requests)
    assert isinstance(result[2], RuntimeError)
    assert result[:2] + result[3:] == alone[:2] + alone[3:]


def test_a_batch_that_fails_before_answering_is_split_until_the_culprit_fails_alone(engine, alone, monkeypatch):
    real_inputs = engine._batch_inputs
    sizes = []

    def batch_inputs(group):
        sizes.append(len(group))
        if any(r.messages[0]["content"] == TEXTS[3] for r in group):
            raise ValueError("this request's preprocessing breaks")
        return real_inputs(group)

    monkeypatch.setattr(engine, "_batch_inputs", batch_inputs)
    result = outcomes(engine, requests_for(TEXTS))
    assert isinstance(result[3], ValueError)
    assert result[:3] + result[4:] == alone[:3] + alone[4:]
    assert sizes[0] == len(TEXTS) and sizes.count(1) >= 1  # the whole batch first, the culprit alone at last


def test_a_failure_after_answers_started_ends_the_unfinished_ones_and_raises_nothing(engine, monkeypatch):
    real_forward = engine.model.forward
    calls = []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")  # what a GPU says mid-batch
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", forward)
    result = outcomes(engine, requests_for(TEXTS[:3]))
    assert all(isinstance(r, torch.cuda.OutOfMemoryError) for r in result)


def test_counting_a_long_prompt_does_not_hold_the_batches_tokenizer(engine):
    """Validation counts with its own tokenizer copy: a batch decoding meanwhile never waits for it."""
    messages = [{"role": "user", "content": "word " * 20_000}]
    acquired = threading.Event()
    with engine._counting_lock:  # validation is busy counting ...
        thread = threading.Thread(target=lambda: (engine._decode([5, 6, 7]), acquired.set()))
        thread.start()
        assert acquired.wait(10), "decoding waited for the counting tokenizer"  # ... and batches still decode
    assert engine.count_prompt_tokens(messages, []) > 20_000


def test_a_server_error_is_logged_once_and_answered_with_its_request_id(caplog):
    from llava_core.serve.app import request_id, server_error_body

    class Headers:  # what the replica sees: Serve's proxy sets x-request-id (or passes the client's on)
        def __init__(self, value):
            self.headers = {"x-request-id": value}

    with caplog.at_level("ERROR", logger="llava_core.serve.app"):
        body = server_error_body(KeyError("row"), request_id(Headers("3f2a-77")))
    assert body["error"]["message"] == "internal server error (KeyError); request id 3f2a-77"
    assert (body["error"]["type"], body["error"]["code"]) == ("server_error", "internal_error")
    assert [r.getMessage() for r in caplog.records] == ["request 3f2a-77 failed"] and caplog.records[0].exc_info
    # A client's own id that would forge log lines is replaced by a fresh one.
    forged = request_id(Headers("x\nERROR fake line"))
    assert "\n" not in forged and len(forged) == 32
