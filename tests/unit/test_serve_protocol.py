"""The request checks in-process, without a server: every bad request the live endpoint test sends
(tests/serve_requests.py) is refused here with the same status and message; what a checked request hands the engine;
the checks that need the model's token counts; the response bodies and the event stream; and the protocol module's
purity (no torch, no network client)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llava_core.config import ServeSettings
from llava_core.inference.answer_stream import StreamEvent
from llava_core.inference.decoding import DecodingParams
from llava_core.serve import json_body, protocol, responses
from llava_core.serve.errors import ApiError
from llava_core.serve.media import decode_media
from llava_core.serve.sse import ChunkWriter
from tests.serve_requests import BAD_REQUESTS, GOOD_PNG, IMAGE_URLS, LIMITS, MODEL, good_body, image_part

# The live server's settings, as far as the checks read them.
SETTINGS = ServeSettings(**LIMITS, **IMAGE_URLS)
# Refused by the replica once the engine has counted the prompt's tokens: tested below with the numbers instead.
NEEDS_THE_MODEL = {"prompt longer than the context"}
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def refusal(body) -> ApiError:
    """The error the endpoint answers `body` (bytes as sent, or JSON data) with, short of counting tokens."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as caught:
        chat = protocol.parse_chat_request(json_body.parse_json_body(data), SETTINGS, MODEL)
        decode_media(chat, SETTINGS)
    return caught.value


@pytest.mark.parametrize("case", [case for case in BAD_REQUESTS if case not in NEEDS_THE_MODEL])
def test_each_bad_request_is_refused_as_the_live_server_refuses_it(case):
    body, status, fragment = BAD_REQUESTS[case]
    error = refusal(body)
    assert (error.status, error.error_type) == (status, "invalid_request_error"), error.message
    assert fragment in error.message, error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("changes, param, message", [
    ({"temperature": "hot"}, "temperature", "temperature must be a number"),
    ({"temperature": 2.5}, "temperature", "temperature must be between 0 and 2"),
    ({"top_p": -0.1}, "top_p", "top_p must be between 0 and 1"),
    ({"seed": True}, "seed", "seed must be a 64-bit integer"),
    ({"stop": ["a", 1]}, "stop", "stop must be a string or an array of strings"),
    ({"stop": ["a"] * 5}, "stop", "stop accepts at most 4 strings"),
    ({"max_tokens": 33}, "max_tokens", "max_tokens is 33, over this server's limit of 32"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be a positive integer"),
    ({"n": True}, "n", "only n=1 is supported"),
    ({"stream": True, "stream_options": {"include_usage": None}}, "stream_options",
     'stream_options must be an object like {"include_usage": true}'),
    ({"model": ""}, "model", "model is required and must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, 7]}]}, "messages[0].content[1]",
     "messages[0].content[1] must be an object"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 7}}]}]},
     "messages[0].content[0].image_url", "messages[0].content[0].image_url must be an object with a string url"),
    ({"messages": [{"role": "user", "content": [{"text": "Hi"}]}]}, "messages[0].content[0].type",
     "messages[0].content[0].type: unknown content part type None; expected 'text' or 'image_url'"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "an <image>"}]}]},
     "messages[0].content[0].text", "messages[0].content[0].text contains <image>; send images as image_url parts "
                                    "instead"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     "messages[1].role", "the last message must be from the user"),
])
def test_a_refusal_names_the_field_and_says_what_is_wrong(changes, param, message):
    error = refusal(good_body(**changes))
    assert (error.status, error.param, error.message) == (400, param, message)


def test_a_role_that_is_not_a_string_is_a_400_not_a_500():
    # An unhashable role once reached `role in ROLES` and raised TypeError, a 500.
    error = refusal(good_body(messages=[{"role": ["user"], "content": "Hi"}]))
    assert (error.status, error.param) == (400, "messages[0].role") and "unknown role ['user']" in error.message


def test_the_first_problem_in_field_order_is_the_one_reported():
    assert refusal(good_body(model="gpt-4o", temperature="hot")).status == 404  # the model is checked first
    assert refusal(good_body(temperature="hot", messages=[])).param == "temperature"
    # The images are counted before any message is checked: 1000 images cost nothing to refuse.
    error = refusal(good_body(messages=[{"role": "robot", "content": [image_part(GOOD_PNG)] * 1000}]))
    assert error.code == "too_many_images"


def test_a_checked_request_holds_what_the_engine_needs():
    body = {"model": MODEL, "max_completion_tokens": 5, "max_tokens": "ignored beside max_completion_tokens",
            "temperature": 0.5, "top_p": None, "seed": 7, "stop": "\n", "stream": True,
            "stream_options": {"include_usage": True}, "tools": [], "logprobs": False, "frequency_penalty": 0.3,
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                      {**image_part(GOOD_PNG), "detail": "auto"}]},
                         {"role": "assistant", "content": None, "tool_calls": []},
                         {"role": "user", "content": [image_part(GOOD_PNG)]}]}
    chat = protocol.parse_chat_request(body, SETTINGS, MODEL)
    assert chat.template_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "image"}]}]
    assert [where for where, _ in chat.media_parts()] == ["messages[1].content[1].image_url",
                                                          "messages[3].content[0].image_url"]
    assert (chat.requested_max_tokens, chat.stream, chat.include_usage) == (5, True, True)
    decoding = chat.decoding(max_tokens=5)
    assert (decoding.temperature, decoding.top_p, decoding.stop, decoding.seed) == (0.5, 1.0, ("\n",), 7)
    images, videos = decode_media(chat, SETTINGS)
    assert [image.size for image in images] == [(48, 24), (48, 24)] and videos == []


def test_nulls_mean_the_defaults():
    chat = protocol.parse_chat_request(good_body(temperature=None, max_tokens=None, n=None, stream=None, stop=None,
                                                 seed=None, response_format={"type": "text"}), SETTINGS, MODEL)
    assert chat.requested_max_tokens is None and not chat.stream and not chat.include_usage
    assert chat.decoding(4) == DecodingParams(4, temperature=1.0, top_p=1.0, stop=(), seed=None)


def test_the_answer_length_fits_the_context():
    asked, left_to_the_server = (protocol.parse_chat_request(good_body(max_tokens=tokens), SETTINGS, MODEL)
                                 for tokens in (30, None))
    assert protocol.answer_length(asked, prompt_tokens=100, context_length=4096, default_max_tokens=64) == 30
    assert protocol.answer_length(left_to_the_server, 4090, 4096, 64) == 6  # the server's default shrinks to fit
    with pytest.raises(ApiError, match="does not fit the model's context of 4096") as caught:
        protocol.answer_length(left_to_the_server, 4096, 4096, 64)
    assert (caught.value.param, caught.value.code) == ("messages", "context_length_exceeded")
    with pytest.raises(ApiError, match="max_tokens is 30; together they exceed") as caught:
        protocol.answer_length(asked, 4080, 4096, 64)
    assert caught.value.param == "max_tokens"
    with pytest.raises(ApiError, match="over this server's limit of 100 image tokens") as caught:
        protocol.check_image_tokens(101, 100)
    assert caught.value.code == "too_many_image_tokens"


def test_a_plain_answer_body():
    body = responses.ChatCompletion.answer(MODEL, "Red.", "stop", 12, 3).model_dump()
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    assert {k: v for k, v in body.items() if k not in ("id", "created")} == {
        "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Red."}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}
    card = {"id": MODEL, "object": "model", "created": 5, "owned_by": "llava-ray"}
    assert responses.ModelList(data=[responses.ModelCard(id=MODEL, created=5)]).model_dump() == {
        "object": "list", "data": [card]}


def events_of(text: str) -> list:
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[len("data: "):] for line in lines]


@pytest.mark.parametrize("include_usage", [False, True])
def test_the_event_stream(include_usage):
    writer = ChunkWriter(MODEL, include_usage)
    text = writer.start() + writer.event(StreamEvent("Re")) + writer.event(StreamEvent("d.", "stop", 12, 3))
    *chunks, done = events_of(text)
    assert done == "[DONE]"
    chunks = [json.loads(chunk) for chunk in chunks]
    assert len({(c["id"], c["created"], c["object"], c["model"]) for c in chunks}) == 1
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert [c["choices"][0]["delta"] for c in chunks if c["choices"]] == [
        {"role": "assistant", "content": ""}, {"content": "Re"}, {"content": "d."}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, None, None, "stop"]
    if include_usage:  # OpenAI's shape: `usage: null` until a last chunk that has it and no choices
        assert [c["usage"] for c in chunks[:-1]] == [None] * 4
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 3,
                                                                       "total_tokens": 15}
    else:
        assert len(chunks) == 4 and all("usage" not in c for c in chunks)


def test_the_protocol_imports_no_torch_and_no_network_client():
    """The request models are pure data: importing them loads no model code and nothing that fetches."""
    absent = ["torch", "transformers", "requests", "httpx", "urllib3", "aiohttp", "http.client", "ssl", "PIL", "ray",
              "fastapi", "llava_core.serve.image_fetch", "llava_core.serve.media", "llava_core.inference.engine"]
    code = f"import sys, llava_core.serve.protocol; print([m for m in {absent!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
