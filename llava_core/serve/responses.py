"""The OpenAI Chat Completions bodies the server answers with: a completion, a streamed chunk, the model list."""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional

from pydantic import BaseModel, Field, model_serializer


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def counted(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[Choice]
    usage: Usage

    @classmethod
    def answer(cls, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> ChatCompletion:
        choice = Choice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        return cls(model=model, choices=[choice], usage=Usage.counted(prompt_tokens, completion_tokens))


class Delta(BaseModel):
    """What one chunk adds: the role in the first, text in the following ones, nothing in the one that finishes."""
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer
    def given_fields(self) -> dict:
        return {name: getattr(self, name) for name in type(self).model_fields if name in self.model_fields_set}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer. `usage` is only sent when the client asked for it
    (`stream_options.include_usage`): null until the last chunk, which has it and no choices."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llava-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
