"""Normalise one LLaVA-format row: its image list and its conversation (reading files is `sources.py`'s job).

Accepts turns as `from/value` or `role/content`; `image` as one path, a list of paths, or absent (text-only);
`video` as one video file or a list of its frame images (LLaVA-OneVision / LLaVA-NeXT video rows), never beside
`image`. A video row's one media tag may be `<video>` or `<image>` (LLaVA-NeXT's video data writes `<image>`); it
becomes `<video>`.
Problems are raised as `RowError` with a short machine-readable reason, so the pipeline can count and write them
instead of crashing or dropping silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from llava_core.model.tokens import IMAGE_TOKEN as IMAGE_TAG, VIDEO_TOKEN as VIDEO_TAG

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
    text: str  # with every <image> (<video>) tag of the turn moved to its front, one "<image>\n" per image


def image_list(row: dict) -> list[str]:
    image = row.get("image")
    if image is None or image == "":
        return []
    return [image] if isinstance(image, str) else list(image)


def video_of(row: dict):
    """The row's `video` (a file name or a list of frame names), None when it has none; a row with both a video and
    images is a `video_with_images` reject (one medium per row, as OneVision's data has it)."""
    video = row.get("video")
    if video is None or video == "" or video == []:
        return None
    if image_list(row):
        raise RowError("video_with_images", "a row holds either images or one video, not both")
    return video


def normalise_conversation(row: dict, n_images: int, video: bool = False) -> list[Turn]:
    """The row's turns, checked, each with its media tags at its front: `n_images` `<image>` tags, or for a `video`
    row one `<video>` tag."""
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
    tag, count = _media_tag(turns, n_images, video)
    tags = sum(t.text.count(tag) for t in turns)
    if count == 1 and tags == 0:
        tags = _add_missing_tag(turns, tag)
    if tags != count:
        raise RowError("image_tag_mismatch", f"{tags} {tag} tags for {count} {'video' if video else 'images'}")
    if any(tag in t.text for t in turns if t.role == ASSISTANT):
        raise RowError("image_tag_mismatch", f"{tag} in an assistant turn")
    for turn in turns:
        turn.text = _tags_to_front(turn.text, tag)
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


def _media_tag(turns: list[Turn], n_images: int, video: bool) -> tuple[str, int]:
    """The tag the row's media use and how many the turns must hold: a video row's `<image>` tags become `<video>`.
    (A `<video>` in another row is found after tokenizing, where the family says whether it is a placeholder.)"""
    if not video:
        return IMAGE_TAG, n_images
    for turn in turns:
        turn.text = turn.text.replace(IMAGE_TAG, VIDEO_TAG)
    return VIDEO_TAG, 1


def _add_missing_tag(turns: list[Turn], tag: str = IMAGE_TAG) -> int:
    # Rows with one image and no tag exist in the wild (the official loader puts the image first): do the same.
    turns[0].text = tag + "\n" + turns[0].text
    return 1


def _tags_to_front(text: str, tag: str = IMAGE_TAG) -> str:
    n = text.count(tag)
    if n == 0:
        return text
    rest = re.sub(r"\s*" + re.escape(tag) + r"\s*", " ", text).strip()
    return (tag + "\n") * n + rest
