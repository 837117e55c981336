"""Normalise one LLaVA-format row: its image list and its conversation (reading files is `sources.py`'s job).

Accepts turns as `from/value` or `role/content`; `image` as one path, a list of paths, or absent (text-only).
Problems are raised as `RowError` with a short machine-readable reason, so the pipeline can count and write them
instead of crashing or dropping silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

IMAGE_TAG = "<image>"
USER, ASSISTANT = "user", "assistant"
ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}


class RowError(ValueError):
    """A row that cannot be trained on; `reason` is the key counted in the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Turn:
    role: str  # USER or ASSISTANT
    text: str  # with every <image> tag of the turn moved to its front, one "<image>\n" per image


def image_list(row: dict) -> list[str]:
    image = row.get("image")
    if image is None or image == "":
        return []
    return [image] if isinstance(image, str) else list(image)


def normalise_conversation(row: dict, n_images: int) -> list[Turn]:
    raw = row.get("conversations") if "conversations" in row else row.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RowError("empty_conversation", "no turns")
    turns = [_parse_turn(t) for t in raw]
    turns = [t for t in turns if t.role != "system"]
    while turns and turns[0].role != USER:  # LLaVA drops a leading non-human turn
        turns = turns[1:]
    if len(turns) < 2:
        raise RowError("empty_conversation", "needs at least one user turn and one assistant answer")
    for i, turn in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if turn.role != expected:
            raise RowError("roles_out_of_order", f"turn {i} is {turn.role}, expected {expected}")
    if turns[-1].role != ASSISTANT:
        turns = turns[:-1]  # a trailing question without an answer teaches nothing
    tags = sum(t.text.count(IMAGE_TAG) for t in turns)
    if n_images == 1 and tags == 0:
        tags = _add_missing_tag(turns)
    if tags != n_images:
        raise RowError("image_tag_mismatch", f"{tags} <image> tags for {n_images} images")
    if any(IMAGE_TAG in t.text for t in turns if t.role == ASSISTANT):
        raise RowError("image_tag_mismatch", "<image> in an assistant turn")
    for turn in turns:
        turn.text = _tags_to_front(turn.text)
        if turn.role == ASSISTANT and not turn.text.strip():
            raise RowError("empty_conversation", "empty assistant answer")
    return turns


def _parse_turn(turn) -> Turn:
    if not isinstance(turn, dict):
        raise RowError("malformed_conversation", f"turn is {type(turn).__name__}, not an object")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if role == "system":
        return Turn("system", str(text or ""))
    if role not in ROLE_ALIASES:
        raise RowError("malformed_conversation", f"unknown role {role!r}")
    if not isinstance(text, str):
        raise RowError("malformed_conversation", f"turn text is {type(text).__name__}, not a string")
    return Turn(ROLE_ALIASES[role], text)


def _add_missing_tag(turns: list[Turn]) -> int:
    # Rows with one image and no tag exist in the wild (the official loader puts the image first): do the same.
    turns[0].text = IMAGE_TAG + "\n" + turns[0].text
    return 1


def _tags_to_front(text: str) -> str:
    n = text.count(IMAGE_TAG)
    if n == 0:
        return text
    rest = re.sub(r"\s*<image>\s*", " ", text).strip()
    return (IMAGE_TAG + "\n") * n + rest
