"""One streamed answer as server-sent events: OpenAI's `chat.completion.chunk` objects (`responses.ChatCompletionChunk`)
as `data:` lines. A first chunk with the role, one chunk per text delta, a chunk with `finish_reason`, a `usage` chunk
with no choices when the client asked for it (`stream_options.include_usage`, as OpenAI does), then `data: [DONE]`.
"""
from __future__ import annotations

import json
import time
from typing import Optional

from llava_core.inference.answer_stream import StreamEvent
from llava_core.serve.responses import ChatCompletionChunk, ChunkChoice, Delta, Usage, completion_id

DONE = "data: [DONE]\n\n"


def data_line(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


class ChunkWriter:
    """The events of one answer; every chunk carries the same id, creation time and model."""

    def __init__(self, model_name: str, include_usage: bool):
        self.id, self.created, self.model = completion_id(), int(time.time()), model_name
        self.include_usage = include_usage

    def start(self) -> str:
        return self.chunk(Delta(role="assistant", content=""))

    def event(self, event: StreamEvent) -> str:
        text = self.chunk(Delta(content=event.delta)) if event.delta else ""
        if event.finish_reason is None:
            return text
        text += self.chunk(Delta(), event.finish_reason)
        if self.include_usage:
            text += self.sse(self.envelope([], Usage.counted(event.prompt_tokens, event.completion_tokens)))
        return text + DONE

    def chunk(self, delta: Delta, finish_reason: Optional[str] = None) -> str:
        return self.sse(self.envelope([ChunkChoice(delta=delta, finish_reason=finish_reason)]))

    def envelope(self, choices: list[ChunkChoice], usage: Optional[Usage] = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def sse(self, chunk: ChatCompletionChunk) -> str:
        # OpenAI's chunks say `usage: null` until the last one, and only when the client asked for usage.
        return data_line(chunk.model_dump(exclude=None if self.include_usage else {"usage"}))
