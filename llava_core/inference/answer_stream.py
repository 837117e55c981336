"""One request's generated tokens become text, step by step: what a streaming client receives as deltas is, joined,
exactly the non-streaming answer.

Both kinds of request go through `AnswerStream`; a plain answer is its events joined (`completion_from_events`). It
ends the answer at the end-of-sequence token, at the first stop string or at max_tokens, and holds back text that may
still change: a trailing partial UTF-8 character, a suffix that could be the start of a stop string, and whitespace at
either end (the answer is stripped, as LLaVA's own serving and the evaluation do).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from llava_core.inference.decoding import DecodingParams

# What decoding shows for the first bytes of a character split over tokens; at the end of the text it may still
# become a real character with the next token.
INCOMPLETE_CHARACTER = "\ufffd"


@dataclass
class StreamEvent:
    """What one request gets from one decoding step; `finish_reason` is set on its last event only."""
    delta: str
    finish_reason: Optional[str] = None  # "stop" (end of sequence or a stop string), "length" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[BaseException] = None  # with finish_reason "error": why this request's generation failed


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


def completion_from_events(events: list[StreamEvent]) -> Completion:
    """One request's events, joined: the answer a plain (non-streaming) request gets, or its error raised."""
    last = events[-1]
    if last.error is not None:
        raise last.error
    return Completion("".join(e.delta for e in events), last.finish_reason, last.prompt_tokens,
                      last.completion_tokens)


def first_stop_position(text: str, stops: tuple[str, ...]) -> Optional[int]:
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return min(positions) if positions else None


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that a stop string starts with: it may yet become a stop."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class AnswerStream:
    def __init__(self, decoding: DecodingParams, prompt_tokens: int, eos_token_ids: set[int],
                 decode: Callable[[list[int]], str], byte_token_ids: frozenset[int] = frozenset()):
        self.decoding = decoding
        self.prompt_tokens = prompt_tokens
        self.eos_token_ids = eos_token_ids
        self.decode = decode
        self.byte_token_ids = byte_token_ids  # LLaMA-style byte fallback pieces, <0x00> ... <0xFF>
        self.tokens: list[int] = []
        self.generated = 0  # tokens the model produced for this answer, an end-of-sequence token included
        self.sent = ""  # text already handed out
        self.finish_reason: Optional[str] = None
        self.text = ""  # the answer so far, cut at a stop string

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> StreamEvent:
        """Take the next generated token; the event carries whatever text became certain."""
        self.generated += 1
        if token in self.eos_token_ids:
            return self.finish("stop")
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        stop_at = first_stop_position(self.text, self.decoding.stop)
        if stop_at is not None:
            self.text = self.text[:stop_at]
            return self.finish("stop")
        if self.generated >= self.decoding.max_tokens:
            return self.finish("length")
        return StreamEvent(self.take(self.settled_text()))

    def finish(self, reason: str) -> StreamEvent:
        self.finish_reason = reason
        return StreamEvent(self.take(self.text.strip()), reason, self.prompt_tokens, self.generated)

    def fail(self, error: BaseException) -> StreamEvent:
        """End this answer with an error; text not sent yet is dropped (it came before the failure, unchecked)."""
        self.finish_reason = "error"
        return StreamEvent("", "error", self.prompt_tokens, self.generated, error)

    def settled_text(self) -> str:
        text = self.text.lstrip() if not self._ends_in_bytes() else self.decode(self._before_bytes()).lstrip()
        text = text[:len(text) - stop_prefix_length(text, self.decoding.stop)]
        return text.rstrip(INCOMPLETE_CHARACTER).rstrip()

    def _ends_in_bytes(self) -> bool:
        return bool(self.tokens) and self.tokens[-1] in self.byte_token_ids

    def _before_bytes(self) -> list[int]:
        """The tokens before a trailing run of byte-fallback pieces. Such a run is decoded as one: it may still
        become a character, or turn every byte of it into U+FFFD, an ASCII one already shown included (`<0x39>` is
        "9" alone, but "\ufffd\ufffd" followed by `<0xB9>`). Text from a run is final once a piece ends it."""
        end = len(self.tokens)
        while end and self.tokens[end - 1] in self.byte_token_ids:
            end -= 1
        return self.tokens[:end]

    def take(self, text: str) -> str:
        """The part of `text` not sent yet. Text already sent cannot be taken back: should decoding ever revise it,
        the delta waits until the text agrees with what was sent again."""
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
