"""The OpenAI Chat Completions request a client may send, as pydantic models that check it completely (the body's
JSON is `json_body`'s, the answers the server sends `responses`').

Pure data: no torch, no network, no image decoding, no HTTP. Everything a client can get wrong in the body is found
here, before the request costs anything, and reported as a 400 naming the field (`messages[0].content[1].image_url`):
a bad request must never fail the batch it would have shared. Each field's type, range and checks are on the field;
`parse_chat_request` reports the first field that fails, in the order the fields are declared. What needs more than
the body is checked next: the images and videos by `serve.media` (decoding them, fetching allowed URLs), the token
counts by the replica with `check_image_tokens` and `answer_length`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from llava_core.config import ServeSettings
from llava_core.data.formats import IMAGE_TAG, VIDEO_TAG
from llava_core.inference.decoding import DecodingParams
from llava_core.serve.errors import ApiError, bad_request, model_not_found

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
ONLY_N_1 = "only n=1 is supported"
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.manual_seed accepts
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)
# Features a client would silently not get are refused, not ignored (null, false and [] mean "not asked").
UNSUPPORTED = {
    "tools": "tool calling", "functions": "function calling", "logprobs": "logprobs", "top_logprobs": "logprobs",
    "audio": "audio output",
}


# ---- what the checks know of the server, and how a refusal leaves pydantic ----------------------------------------

@dataclass(frozen=True)
class Server:
    """The validation context: the serve settings, the model name clients must send, and whether the model's family
    reads `video_url` parts (LLaVA-OneVision)."""
    settings: ServeSettings
    model_name: str
    takes_videos: bool = False

    @property
    def placeholders(self) -> tuple[str, ...]:
        # What the chat template renders image and video parts as (the model's IMAGE_TOKEN and VIDEO_TOKEN): typed by
        # a client, one would become a placeholder with nothing behind it.
        return (IMAGE_TAG, VIDEO_TAG) if self.takes_videos else (IMAGE_TAG,)


class Refused(ValueError):
    """A check's refusal inside the models, carried out of pydantic (as its `value_error`) to `refusal`. The 400 names
    the field pydantic met it at, followed by `at`; its message is that name followed by `text`, or `text` alone when
    `whole`. `error` is an ApiError given as it is (the 404 of an unknown model)."""

    def __init__(self, text: str = "", at: str = "", code: Optional[str] = None, whole: bool = False,
                 error: Optional[ApiError] = None):
        super().__init__(text or (error.message if error else ""))
        self.text, self.at, self.code, self.whole, self.error = text, at, code, whole, error

    def api_error(self, where: str) -> ApiError:
        if self.error is not None:
            return self.error
        param = where + self.at
        return bad_request(self.text if self.whole else param + self.text, param, self.code)


def between(low: float, high: float) -> Refused:
    return Refused(f" must be between {low:g} and {high:g}")


# What pydantic's own errors (a wrong type, a missing field, a value out of range) say, by the field's path (list
# indexes as "*"): the first refusal is for a wrong type, the second, where there is one, for a value out of range.
FIELD_REFUSALS: dict[tuple, tuple[Refused, ...]] = {
    ("model",): (Refused(" is required and must be a string"),),
    ("n",): (Refused(ONLY_N_1, whole=True),),
    ("stream",): (Refused(" must be a boolean"),),
    ("stream_options",): (Refused('stream_options must be an object like {"include_usage": true}', whole=True),),
    ("temperature",): (Refused(" must be a number"), between(*TEMPERATURE_RANGE)),
    ("top_p",): (Refused(" must be a number"), between(*TOP_P_RANGE)),
    ("seed",): (Refused(" must be a 64-bit integer"),),
    ("stop",): (Refused(" must be a string or an array of strings"),),
    ("max_completion_tokens",): (Refused(" must be a positive integer"),),
    ("max_tokens",): (Refused(" must be a positive integer"),),
    ("messages",): (Refused(" must be a non-empty array"),),
    ("messages", "*"): (Refused(" must be an object"),),
    ("messages", "*", "content"): (Refused(" must be a string or an array of content parts"),),
    ("messages", "*", "content", "*"): (Refused(" must be an object"),),
    ("messages", "*", "content", "*", "text"): (Refused(" must be a string"),),
    ("messages", "*", "content", "*", "image_url"): (Refused(" must be an object with a string url"),),
    ("messages", "*", "content", "*", "video_url"): (Refused(" must be an object with a string url"),),
}
RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long"}
# The names of the union members a value was tried as; they appear in pydantic's paths but not in the request's.
TAGS = {"text content", "parts content", "text part", "image_url part", "video_url part", "other part"}


def refusal(error: dict) -> ApiError:
    """The ApiError for one of pydantic's errors, naming the field as the request does (`messages[0].content[1]`)."""
    loc = [part for part in error["loc"] if part not in TAGS]
    refused = error.get("ctx", {}).get("error")
    if error["type"] == "value_error" and isinstance(refused, Refused):
        return refused.api_error(path(loc))
    for length in range(len(loc), 0, -1):
        says = FIELD_REFUSALS.get(tuple("*" if isinstance(part, int) else part for part in loc[:length]))
        if says:
            return says[-1 if error["type"] in RANGE_ERRORS else 0].api_error(path(loc[:length]))
    return bad_request(f"{path(loc) or 'the request body'}: {error['msg']}", path(loc) or None)  # not expected


def path(loc: list) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def parse_chat_request(body: Any, settings: ServeSettings, model_name: str,
                       takes_videos: bool = False) -> ChatCompletionRequest:
    """A checked request, or the ApiError of its first problem; `takes_videos`: the model's family reads `video_url`
    parts (LLaVA-OneVision)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(body, context=Server(settings, model_name, takes_videos))
    except ValidationError as error:
        raise refusal(error.errors()[0]) from None


# ---- the checks the fields carry ---------------------------------------------------------------------------------

def none_is(default: Any):
    """A before-validator: JSON's null means the field's default, as OpenAI's API has it."""
    return BeforeValidator(lambda value: default if value is None else value)


def served_model(name: str, info: ValidationInfo) -> str:
    if name != info.context.model_name:
        raise Refused(error=model_not_found(name, info.context.model_name))
    return name


def only_one(n: int) -> int:
    if n != 1:
        raise Refused(ONLY_N_1, whole=True)
    return n


def text_format(response_format: Any) -> Any:
    if response_format is not None and response_format != {"type": "text"}:
        raise Refused("only response_format {\"type\": \"text\"} is supported", whole=True)
    return response_format


def only_when_streaming(options: Any, info: ValidationInfo) -> Any:
    if options is not None and not info.data.get("stream"):
        raise Refused(" is only allowed when stream is true")
    return options


def nonzero_in_float32(top_p: float) -> float:
    # The sampler compares float32 probabilities with it: 1e-300 is 0.0 there, and would keep no token at all.
    if np.float32(top_p) <= 0:
        raise Refused(" must be greater than 0, also as the float32 the sampler compares it in (1e-300 is 0 there)")
    return top_p


def as_stop_list(stop: Any) -> Any:
    return [] if stop is None else [stop] if isinstance(stop, str) else stop


def at_most_stops(stops: list[str]) -> list[str]:
    if len(stops) > MAX_STOP_STRINGS:
        raise Refused(f" accepts at most {MAX_STOP_STRINGS} strings")
    return stops


def within_limit(value: int, info: ValidationInfo) -> int:
    limit = info.context.settings.max_tokens_limit
    if value > limit:
        raise Refused(f" is {value}, over this server's limit of {limit}")
    return value


def unless_max_completion_tokens(value: Any, info: ValidationInfo) -> Any:
    # max_completion_tokens is the current name; max_tokens is the older one that most clients still send.
    return None if info.data.get("max_completion_tokens") is not None else value


def counted_messages(messages: Any, info: ValidationInfo) -> Any:
    """Count images, videos and text before checking any message: a request with 1000 images or 8 MB of text is
    refused for that at once."""
    if not isinstance(messages, list) or not messages:
        raise Refused(" must be a non-empty array")
    server: Server = info.context
    check_image_count(messages, server.settings.max_images)
    check_video_count(messages, server.settings.max_videos, server.takes_videos)
    check_prompt_chars(messages, server.settings.max_prompt_chars)
    return messages


def count_parts(raw_messages: list, kind: str) -> int:
    return sum(
        1
        for message in raw_messages if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"] if isinstance(part, dict) and part.get("type") == kind
    )


def check_image_count(raw_messages: list, max_images: int) -> None:
    count = count_parts(raw_messages, "image_url")
    if count > max_images:
        raise Refused(f"too many images: {count}, the limit is {max_images} per request", code="too_many_images",
                      whole=True)


def check_video_count(raw_messages: list, max_videos: int, takes_videos: bool) -> None:
    """Refuse videos outright where the model's family has no video input (a video costs ~0.1-1 s of CPU)."""
    count = count_parts(raw_messages, "video_url")
    if count and not takes_videos:
        raise Refused("this model takes no video (video_url parts are read by llava_onevision models only)",
                      code="video_not_supported", whole=True)
    if count > max_videos:
        raise Refused(f"too many videos: {count}, the limit is {max_videos} per request", code="too_many_videos",
                      whole=True)


def check_prompt_chars(raw_messages: list, max_chars: int) -> None:
    """Count the text before tokenizing it: an 8 MB prompt takes the tokenizer seconds and could never fit anyway."""
    chars = sum(len(text) for text in message_texts(raw_messages))
    if chars > max_chars:
        raise Refused(f"the messages hold {chars} characters of text, over this server's limit of {max_chars}",
                      code="context_length_exceeded", whole=True)


def message_texts(raw_messages: list):
    for message in raw_messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def ends_with_user(messages: list[ChatMessage]) -> list[ChatMessage]:
    if messages[-1].role != "user":
        raise Refused("the last message must be from the user", at=f"[{len(messages) - 1}].role", whole=True)
    return messages


def known_role(role: Any) -> str:
    if not isinstance(role, str) or role not in ROLES:
        raise Refused(f": unknown role {role!r}; expected one of {sorted(ROLES)}")
    return ROLES[role]


def no_typed_placeholder(text: str, info: ValidationInfo) -> str:
    for token in info.context.placeholders:
        if token in text:
            medium = "videos as video_url" if token == VIDEO_TAG else "images as image_url"
            raise Refused(f" contains {token}; send {medium} parts instead")
    return text


# ---- the request -------------------------------------------------------------------------------------------------

STRICT = ConfigDict(strict=True)  # no "2" for an int, no true for a number; unknown keys are ignored, as OpenAI does
Text = Annotated[str, AfterValidator(no_typed_placeholder)]


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: Text

    def template_part(self) -> dict:
        return {"type": "text", "text": self.text}


class MediaUrl(BaseModel):
    model_config = STRICT
    url: str


class MediaPart(BaseModel):
    """A content part that points at a medium: `{"type": "<medium>_url", "<medium>_url": {"url": ...}}`."""
    model_config = STRICT
    medium: ClassVar[str]

    @property
    def url(self) -> str:
        return getattr(self, f"{self.medium}_url").url

    def template_part(self) -> dict:
        return {"type": self.medium}


class ImagePart(MediaPart):
    medium: ClassVar[str] = "image"
    type: Literal["image_url"]
    image_url: MediaUrl


class VideoPart(MediaPart):
    """vLLM's OpenAI extension for video; read by LLaVA-OneVision models."""
    medium: ClassVar[str] = "video"
    type: Literal["video_url"]
    video_url: MediaUrl


class OtherPart(BaseModel):
    """Anything else in a content array: refused, saying what the server takes instead."""

    @model_validator(mode="before")
    @classmethod
    def refuse(cls, part: Any, info: ValidationInfo) -> Any:
        if not isinstance(part, dict):
            raise Refused(" must be an object")
        expected = "'text', 'image_url' or 'video_url'" if info.context.takes_videos else "'text' or 'image_url'"
        raise Refused(f": unknown content part type {part.get('type')!r}; expected {expected}", at=".type")


def part_kind(part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    return f"{kind} part" if kind in ("text", "image_url", "video_url") else "other part"


def content_kind(content: Any) -> Optional[str]:
    return "text content" if isinstance(content, str) else "parts content" if isinstance(content, list) else None


Part = Annotated[Union[Annotated[TextPart, Tag("text part")], Annotated[ImagePart, Tag("image_url part")],
                       Annotated[VideoPart, Tag("video_url part")], Annotated[OtherPart, Tag("other part")]],
                 Discriminator(part_kind)]
Content = Annotated[Union[Annotated[Text, Tag("text content")], Annotated[list[Part], Tag("parts content")]],
                    Discriminator(content_kind)]


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Annotated[Literal["system", "user", "assistant"], BeforeValidator(known_role)] = \
        Field(None, validate_default=True)  # "developer" is read as "system"
    content: Content = Field(None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def empty_assistant_turn(cls, message: Any) -> Any:
        # Assistant turns that only called tools have no content; there is nothing to show the model.
        if isinstance(message, dict) and message.get("role") == "assistant" and message.get("content") is None:
            return {**message, "content": ""}
        return message

    @model_validator(mode="after")
    def media_from_the_user(self) -> ChatMessage:
        for index, part in enumerate(self.parts()):
            if isinstance(part, MediaPart) and self.role != "user":
                raise Refused(f": {part.medium}s are only accepted in user messages", at=f".content[{index}]")
        return self

    def parts(self) -> list:
        return [] if isinstance(self.content, str) else self.content

    def template_message(self) -> dict:
        """The message as the chat template takes it: images as {"type": "image"} parts, videos as {"type": "video"}."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        return {"role": self.role, "content": [part.template_part() for part in self.content]}


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False  # end the stream with a chunk that carries `usage`


def not_asked(value: Any, info: ValidationInfo) -> Any:
    if value not in (None, False, []):
        raise Refused(f"{UNSUPPORTED[info.field_name]} is not supported by this server ({info.field_name})",
                      whole=True)
    return value


NotSupported = Annotated[Any, AfterValidator(not_asked)]
AnswerLength = Annotated[int, Field(gt=0), AfterValidator(within_limit)]


class ChatCompletionRequest(BaseModel):
    """The fields of a chat completion request this server reads (others are ignored, as OpenAI's API ignores
    unknown ones), in the order they are checked: cheap ones first."""
    model_config = STRICT
    model: Annotated[str, Field(min_length=1), AfterValidator(served_model)]
    n: Optional[Annotated[int, AfterValidator(only_one)]] = None
    tools: NotSupported = None
    functions: NotSupported = None
    logprobs: NotSupported = None
    top_logprobs: NotSupported = None
    audio: NotSupported = None
    response_format: Annotated[Any, AfterValidator(text_format)] = None
    stream: Annotated[bool, none_is(False)] = False
    stream_options: Annotated[Optional[StreamOptions], BeforeValidator(only_when_streaming)] = None
    temperature: Annotated[float, none_is(1.0), Field(ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])] = 1.0
    top_p: Annotated[float, none_is(1.0), Field(ge=TOP_P_RANGE[0], le=TOP_P_RANGE[1]),
                     AfterValidator(nonzero_in_float32)] = 1.0
    seed: Optional[Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]] = None
    stop: Annotated[list[str], BeforeValidator(as_stop_list), AfterValidator(at_most_stops)] = []
    max_completion_tokens: Optional[AnswerLength] = None
    max_tokens: Annotated[Optional[AnswerLength], BeforeValidator(unless_max_completion_tokens)] = None
    messages: Annotated[list[ChatMessage], BeforeValidator(counted_messages), AfterValidator(ends_with_user)]

    @property
    def requested_max_tokens(self) -> Optional[int]:
        """The answer length the client asked for; None when it left it to the server."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def decoding(self, max_tokens: int) -> DecodingParams:
        return DecodingParams(max_tokens, self.temperature, self.top_p, tuple(s for s in self.stop if s), self.seed)

    def template_messages(self) -> list[dict]:
        return [message.template_message() for message in self.messages]

    def media_parts(self) -> list[tuple[str, MediaPart]]:
        """(where, part) of every image_url and video_url part, in the order the chat template places them."""
        return [(f"messages[{i}].content[{j}].{part.type}", part)
                for i, message in enumerate(self.messages) for j, part in enumerate(message.parts())
                if isinstance(part, MediaPart)]


# ---- what needs the model's numbers: checked by the replica once it has counted the tokens -----------------------

def check_model(name: str, model_name: str) -> None:
    if name != model_name:
        raise model_not_found(name, model_name)


def check_image_tokens(image_tokens: int, limit: int) -> None:
    """A request's images cost what their tokens cost: an AnyRes image is up to ~8,800 of them (OneVision at 6x6
    tiles), a OneVision video of 32 frames 6,273, so the limit counts tokens, from the sizes, before any tile is
    cut."""
    if image_tokens > limit:
        raise bad_request(f"the images and videos are {image_tokens} tokens, over this server's limit of {limit} "
                          f"image tokens per request; send fewer or smaller images", "messages",
                          "too_many_image_tokens")


def answer_length(request: ChatCompletionRequest, prompt_tokens: int, context_length: int,
                  default_max_tokens: int) -> int:
    """The answer's max_tokens, fitting the model's context: refuse what cannot fit, shorten the server's default."""
    room = context_length - prompt_tokens
    if room <= 0:
        raise bad_request(f"the prompt is {prompt_tokens} tokens (images and videos included), which does not fit the "
                          f"model's context of {context_length} tokens", "messages", "context_length_exceeded")
    wanted = request.requested_max_tokens
    if wanted is not None and wanted > room:
        raise bad_request(f"the prompt is {prompt_tokens} tokens and max_tokens is {wanted}; together they exceed the "
                          f"model's context of {context_length} tokens", "max_tokens", "context_length_exceeded")
    return wanted if wanted is not None else min(default_max_tokens, room)
