"""The OpenAI Chat Completions wire format: check a request body completely and turn it into engine input.

Everything a client can get wrong is found here, before the request joins a batch, and reported as a 400 naming the
field (`messages[0].content[1].image_url`): a bad request must never fail the batch it would have shared.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
from PIL import Image

from llava_core.config import ServeSettings
from llava_core.model.build import IMAGE_TOKEN
from llava_core.model.families import VIDEO_TOKEN
from llava_core.serve.answer_stream import StreamEvent
from llava_core.serve.engine import Completion, GenerationRequest, SamplingSettings
from llava_core.serve.errors import bad_request, model_not_found
from llava_core.serve.image_input import image_from_url
from llava_core.serve.video_input import video_from_url

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.manual_seed accepts
# A chat request nests about 6 deep (messages[0].content[1].image_url.url); thousands deep exhausts the parser's stack.
MAX_JSON_DEPTH = 32
# A 64-bit seed has 20 digits; a 5,000-digit literal costs quadratic time to convert and Python refuses it anyway.
MAX_NUMBER_CHARS = 40


@dataclass
class ChatRequest:
    messages: list[dict]  # chat-template messages, images as {"type": "image"} parts
    images: list[Image.Image]
    sampling: SamplingSettings  # max_tokens is a placeholder until `fit_to_context` has seen the prompt's length
    requested_max_tokens: Optional[int]  # None when the client left it to the server
    stream: bool = False
    include_usage: bool = False  # streaming only: end with a chunk that carries `usage`
    videos: list = field(default_factory=list)  # each `serve.video_frames` sampled RGB frames; {"type": "video"} parts


@dataclass
class Media:
    """What a request's content parts decode into, in order, and which placeholders the model reads."""
    takes_videos: bool
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)

    @property
    def placeholders(self) -> tuple[str, ...]:
        return (IMAGE_TOKEN, VIDEO_TOKEN) if self.takes_videos else (IMAGE_TOKEN,)


def parse_json_body(data: bytes) -> Any:
    """A request body as JSON, or a 400 for anything that is not plain, finite, shallow, encodable JSON."""
    try:
        body = json.loads(data, parse_int=bounded_int, parse_float=bounded_float, parse_constant=no_constant)
    except RecursionError:
        raise bad_request(f"the request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None
    check_shape(body)
    return body


def bounded_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise bad_request(f"the request body has a number of {len(literal)} digits; numbers are limited to "
                          f"{MAX_NUMBER_CHARS} characters")
    return int(literal)


def bounded_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise bad_request(f"the request body has a number of {len(literal)} characters; numbers are limited to "
                          f"{MAX_NUMBER_CHARS}")
    value = float(literal)
    if not math.isfinite(value):
        raise bad_request(f"the request body has the number {literal}, which is out of range")
    return value


def no_constant(name: str):
    raise bad_request(f"the request body has {name}, which is not JSON; numbers must be finite")


def children(value: Any) -> list:
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    return value if isinstance(value, list) else []


def check_shape(body: Any) -> None:
    """Depth and strings, level by level: iterative, so a deep body cannot exhaust the stack as recursion would."""
    level, depth = [body], 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"the request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
        for value in level:
            if isinstance(value, str):
                check_encodable(value)
        level = [child for value in level for child in children(value)]


def check_encodable(text: str) -> None:
    # JSON's `\ud800` escape of half a UTF-16 pair parses to a lone surrogate, which no UTF-8 encoder (the
    # tokenizer's, the response's) takes.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the request body has a lone UTF-16 surrogate (such as the escape \\ud800) in a string; "
                          "send text as valid Unicode") from None


def parse_chat_request(body: Any, settings: ServeSettings, model_name: str, takes_videos: bool = False) -> ChatRequest:
    """A checked request; `takes_videos`: the model's family reads `video_url` parts (LLaVA-OneVision)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    check_model(body.get("model"), model_name)
    check_n(body)
    check_unsupported(body)
    stream, include_usage = stream_options(body)
    # Cheap checks first: a wrong max_tokens should not cost decoding the images.
    sampling, max_tokens = parse_sampling(body), requested_max_tokens(body, settings)
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise bad_request("messages must be a non-empty array", "messages")
    check_image_count(raw_messages, settings.max_images)
    check_video_count(raw_messages, settings.max_videos, takes_videos)
    check_prompt_chars(raw_messages, settings.max_prompt_chars)
    media = Media(takes_videos)  # filled in order by parse_message, as the chat template places them
    messages = [parse_message(m, f"messages[{i}]", media, settings) for i, m in enumerate(raw_messages)]
    if messages[-1]["role"] != "user":
        raise bad_request("the last message must be from the user", f"messages[{len(messages) - 1}].role")
    return ChatRequest(messages, media.images, sampling, max_tokens, stream, include_usage, media.videos)


def check_model(name: Any, model_name: str) -> None:
    if not isinstance(name, str) or not name:
        raise bad_request("model is required and must be a string", "model")
    if name != model_name:
        raise model_not_found(name)


def stream_options(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_request("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    return stream, options.get("include_usage", False)


def check_n(body: dict) -> None:
    n = body.get("n")
    if n is not None and (not is_int(n) or n != 1):
        raise bad_request("only n=1 is supported", "n")


UNSUPPORTED = {
    "tools": "tool calling", "functions": "function calling", "logprobs": "logprobs", "top_logprobs": "logprobs",
    "audio": "audio output",
}


def check_unsupported(body: dict) -> None:
    """Features a client would silently not get are refused, not ignored (null, false and [] mean "not asked")."""
    for key, feature in UNSUPPORTED.items():
        if body.get(key) not in (None, False, []):
            raise bad_request(f"{feature} is not supported by this server ({key})", key)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format")


def count_parts(raw_messages: list, kind: str) -> int:
    return sum(
        1
        for message in raw_messages if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"] if isinstance(part, dict) and part.get("type") == kind
    )


def check_image_count(raw_messages: list, max_images: int) -> None:
    """Count image parts before decoding any, so a request with 1000 images costs nothing."""
    count = count_parts(raw_messages, "image_url")
    if count > max_images:
        raise bad_request(f"too many images: {count}, the limit is {max_images} per request", "messages",
                          "too_many_images")


def check_video_count(raw_messages: list, max_videos: int, takes_videos: bool) -> None:
    """Count video parts before decoding any (a video costs ~0.1-1 s of CPU), and refuse them outright where the
    model's family has no video input."""
    count = count_parts(raw_messages, "video_url")
    if count and not takes_videos:
        raise bad_request("this model takes no video (video_url parts are read by llava_onevision models only)",
                          "messages", "video_not_supported")
    if count > max_videos:
        raise bad_request(f"too many videos: {count}, the limit is {max_videos} per request", "messages",
                          "too_many_videos")


def check_prompt_chars(raw_messages: list, max_chars: int) -> None:
    """Count the text before tokenizing it: an 8 MB prompt takes the tokenizer seconds and could never fit anyway."""
    chars = sum(len(text) for text in message_texts(raw_messages))
    if chars > max_chars:
        raise bad_request(f"the messages hold {chars} characters of text, over this server's limit of {max_chars}",
                          "messages", "context_length_exceeded")


def message_texts(raw_messages: list):
    for message in raw_messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def parse_message(message: Any, where: str, media: Media, settings: ServeSettings) -> dict:
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object", where)
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role: unknown role {role!r}; expected one of {sorted(ROLES)}", f"{where}.role")
    role = ROLES[role]
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""  # assistant turns that only called tools have no content; there is nothing to show the model
    if isinstance(content, str):
        check_text(content, f"{where}.content", media.placeholders)
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or an array of content parts", f"{where}.content")
    parts = [parse_part(part, f"{where}.content[{i}]", role, media, settings) for i, part in enumerate(content)]
    return {"role": role, "content": parts}


def parse_part(part: Any, where: str, role: str, media: Media, settings: ServeSettings) -> dict:
    if not isinstance(part, dict):
        raise bad_request(f"{where} must be an object", where)
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{where}.text must be a string", f"{where}.text")
        check_text(text, f"{where}.text", media.placeholders)
        return {"type": "text", "text": text}
    if kind == "image_url":
        if role != "user":
            raise bad_request(f"{where}: images are only accepted in user messages", where)
        media.images.append(image_from_url(image_url_of(part, where), settings, f"{where}.image_url"))
        return {"type": "image"}
    if kind == "video_url":  # check_video_count refused them already where the model has no video input
        if role != "user":
            raise bad_request(f"{where}: videos are only accepted in user messages", where)
        media.videos.append(video_from_url(image_url_of(part, where, "video_url"), settings, f"{where}.video_url"))
        return {"type": "video"}
    expected = "'text', 'image_url' or 'video_url'" if media.takes_videos else "'text' or 'image_url'"
    raise bad_request(f"{where}.type: unknown content part type {kind!r}; expected {expected}", f"{where}.type")


def image_url_of(part: dict, where: str, key: str = "image_url") -> str:
    """The url of an `image_url` (or `video_url`) part: `{"type": key, key: {"url": ...}}`."""
    image_url = part.get(key)
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        raise bad_request(f"{where}.{key} must be an object with a string url", f"{where}.{key}")
    return url


def check_text(text: str, where: str, placeholders: tuple[str, ...] = (IMAGE_TOKEN,)) -> None:
    # A typed "<image>" (or, where the model reads videos, "<video>") would become a placeholder with nothing behind.
    for token in placeholders:
        if token in text:
            medium = "videos as video_url" if token == VIDEO_TOKEN else "images as image_url"
            raise bad_request(f"{where} contains {token}; send {medium} parts instead", where)


def parse_sampling(body: dict) -> SamplingSettings:
    temperature = number(body, "temperature", 1.0, low=0.0, high=2.0)
    top_p = number(body, "top_p", 1.0, low=0.0, high=1.0)
    # The sampler compares float32 probabilities with it: 1e-300 is 0.0 there, and would keep no token at all.
    if np.float32(top_p) <= 0:
        raise bad_request("top_p must be greater than 0, also as the float32 the sampler compares it in "
                          "(1e-300 is 0 there)", "top_p")
    seed = body.get("seed")
    if seed is not None and not (is_int(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise bad_request("seed must be a 64-bit integer", "seed")
    return SamplingSettings(max_tokens=1, temperature=temperature, top_p=top_p, stop=stop_strings(body), seed=seed)


def requested_max_tokens(body: dict, settings: ServeSettings) -> Optional[int]:
    # max_completion_tokens is the current name; max_tokens is the older one that most clients still send.
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        return None
    if not is_int(value) or value <= 0:
        raise bad_request(f"{key} must be a positive integer", key)
    if value > settings.max_tokens_limit:
        raise bad_request(f"{key} is {value}, over this server's limit of {settings.max_tokens_limit}", key)
    return value


def check_image_tokens(image_tokens: int, limit: int) -> None:
    """A request's images cost what their tokens cost: an AnyRes image is up to ~8,800 of them (OneVision at 6x6
    tiles), a OneVision video of 32 frames 6,273, so the limit counts tokens, from the sizes, before any tile is
    cut."""
    if image_tokens > limit:
        raise bad_request(f"the images and videos are {image_tokens} tokens, over this server's limit of {limit} "
                          f"image tokens per request; send fewer or smaller images", "messages",
                          "too_many_image_tokens")


def fit_to_context(request: ChatRequest, prompt_tokens: int, context_length: int,
                   default_max_tokens: int) -> GenerationRequest:
    """The engine's input, with an answer length that fits the model's context: refuse what cannot fit, shorten the
    server's own default."""
    room = context_length - prompt_tokens
    if room <= 0:
        raise bad_request(f"the prompt is {prompt_tokens} tokens (images and videos included), which does not fit the "
                          f"model's context of {context_length} tokens", "messages", "context_length_exceeded")
    wanted = request.requested_max_tokens
    if wanted is not None and wanted > room:
        raise bad_request(f"the prompt is {prompt_tokens} tokens and max_tokens is {wanted}; together they exceed the "
                          f"model's context of {context_length} tokens", "max_tokens", "context_length_exceeded")
    max_tokens = wanted if wanted is not None else min(default_max_tokens, room)
    return GenerationRequest(request.messages, request.images, replace(request.sampling, max_tokens=max_tokens),
                             videos=request.videos)


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop accepts at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(s for s in stops if s)


def number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{key} must be a number", key)
    if not low <= value <= high:
        raise bad_request(f"{key} must be between {low:g} and {high:g}", key)
    return float(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_completion_body(completion: Completion, model_name: str) -> dict:
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": completion.text},
            "finish_reason": completion.finish_reason,
            "logprobs": None,
        }],
        "usage": usage_body(completion.prompt_tokens, completion.completion_tokens),
    }


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ChunkWriter:
    """One streamed answer as server-sent events in OpenAI's `chat.completion.chunk` format: a first chunk with
    the role, one chunk per text delta, a chunk with `finish_reason`, a `usage` chunk with no choices when the client
    asked for it (`stream_options.include_usage`, as OpenAI does), then `data: [DONE]`."""

    def __init__(self, model_name: str, include_usage: bool):
        self.id, self.created, self.model = completion_id(), int(time.time()), model_name
        self.include_usage = include_usage

    def start(self) -> str:
        return self.chunk({"role": "assistant", "content": ""})

    def event(self, event: StreamEvent) -> str:
        text = self.chunk({"content": event.delta}) if event.delta else ""
        if event.finish_reason is None:
            return text
        text += self.chunk({}, event.finish_reason)
        if self.include_usage:
            text += self.sse({**self.envelope([]), "usage": usage_body(event.prompt_tokens, event.completion_tokens)})
        return text + "data: [DONE]\n\n"

    def chunk(self, delta: dict, finish_reason: Optional[str] = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        body = self.envelope([choice])
        if self.include_usage:
            body["usage"] = None  # OpenAI's chunks say `usage: null` until the last one
        return self.sse(body)

    def envelope(self, choices: list) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}

    @staticmethod
    def sse(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"


def models_body(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_name, created)]}


def model_card(model_name: str, created: int) -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "llava-ray"}
