"""Read one preference row (a prompt, a chosen and a rejected answer) in the layouts people have, into one form.

Layouts read:
- LLaVA-NeXT's DPO rows (llava/train/train_dpo.py, `DPODataset._get_item` and `make_conv`): `id`, `prompt` (one user
  turn as a string; its loader removes any `<image>` and puts one `<image>\\n` first), `image` (a path or a list) or
  `video`, `chosen` and `rejected` strings, optional `chosen_score`/`rejected_score` (scripts/archived/
  dpo_data_info.py writes VLFeedback's ratings there), and an `answer` written empty (not read).
- Hub rows as TRL's preference format has them (TRL docs/source/dataset_formats.md, "Preference" and "Vision
  datasets"; HuggingFaceH4/rlaif-v_formatted): `prompt`, `chosen` and `rejected`, each a string or a list of chat
  messages whose `content` is a string or a list of `{"type": "text" | "image" | "video"}` parts; the images inline
  (`images` or `image`: sources.py hands them on as `image` names beside their bytes). openbmb/RLAIF-V-Dataset's own
  rows name the prompt `question`; UltraFeedback-style rows name the scores `score_chosen`/`score_rejected`.
A prompt given as messages may be a whole conversation (user, assistant, ..., user): both answers follow its last turn.

Media, tags and roles are normalised by formats.py, as for any instruction row (a one-image row without a tag gets it
first; a video row's `<image>` becomes `<video>`; `human`/`gpt` and `from`/`value` are read), applied to the prompt
followed by each answer in turn, so both answers pass the same checks. Problems raise `RowError`: `missing_field`,
`malformed_prompt`, `malformed_answer`, `malformed_score`, `empty_answer`, `identical_answers`, and formats.py's own
(`image_tag_mismatch`, `roles_out_of_order`, `malformed_conversation`, `video_with_images`, `empty_conversation`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llava_core.data import formats, templates
from llava_core.data.formats import ASSISTANT, IMAGE_TAG, VIDEO_TAG, RowError, Turn

PROMPT_FIELDS = ("prompt", "question")  # LLaVA-NeXT and TRL; openbmb/RLAIF-V-Dataset's raw rows
SCORE_FIELDS = {"chosen": ("chosen_score", "score_chosen"), "rejected": ("rejected_score", "score_rejected")}
PART_TAGS = {"image": IMAGE_TAG, "video": VIDEO_TAG}


@dataclass
class PreferencePair:
    id: str
    prompt: list[Turn]  # user, assistant, ..., user: media tags at the front of their turns, as formats.py leaves them
    images: list[str]  # the row's image names (formats.image_list); [] with a video or for text only
    video: str | list | None  # a video file or its frame list (formats.video_of)
    chosen: str
    rejected: str
    chosen_score: float | None = None
    rejected_score: float | None = None

    def conversation(self, answer: str) -> list[Turn]:
        """The prompt followed by `answer` (the chosen or the rejected one), as fresh turns to render."""
        return [Turn(t.role, t.text) for t in self.prompt] + [Turn(ASSISTANT, answer)]


@dataclass
class PairTokens:
    """Both answers tokenized after the same prompt: labels only on the final answer (and its end-of-turn token)."""
    prompt_length: int  # the shared prompt's tokens, media placeholders included: the same ids in both sequences
    chosen_ids: np.ndarray
    chosen_labels: np.ndarray
    rejected_ids: np.ndarray
    rejected_labels: np.ndarray


def tokenize_pair(pair: PreferencePair, template: str, tokenizer, media_token_id: int, media_counts: list[int],
                  max_length: int, medium: str = "image") -> PairTokens:
    """The pair as the preference stage trains on it: each answer rendered after the prompt by the template the other
    stages use and masked by its answer-boundary rule (`templates.tokenize_with_labels`: the answer's tokens start
    where the inference prompt's end), then only the final answer kept supervised (earlier assistant turns of a
    multi-turn prompt are context), the media placeholders expanded to `media_counts` and `max_length` enforced
    (a pair is never truncated: a cut answer is not the answer that was judged). Raises `RowError`:
    `identical_answers` when both answers tokenize alike, `answer_boundary` when the two prompts' tokens differ (a
    template or tokenizer that merges the answer's first token into the prompt), `too_long`, and the template's own
    reasons."""
    chosen = _answer_tokens(pair, pair.chosen, template, tokenizer)
    rejected = _answer_tokens(pair, pair.rejected, template, tokenizer)
    (chosen_ids, chosen_labels, start), (rejected_ids, rejected_labels, rejected_start) = chosen, rejected
    if start != rejected_start or not np.array_equal(chosen_ids[:start], rejected_ids[:start]):
        raise RowError("answer_boundary", "the prompt's tokens differ between the two answers, so the answers do not "
                                          "start where generation starts")
    if np.array_equal(chosen_ids, rejected_ids):
        raise RowError("identical_answers", "the chosen and rejected answers tokenize alike")
    placeholders = int(np.sum(media_counts)) - len(media_counts)  # each tag becomes its count of placeholders
    expanded = [templates.expand_image_tokens(ids, labels, media_token_id, media_counts, medium)
                for ids, labels in ((chosen_ids, chosen_labels), (rejected_ids, rejected_labels))]
    for ids, _ in expanded:
        if len(ids) > max_length:
            raise RowError("too_long", f"{len(ids)} tokens > max_length {max_length} (the longer answer's sequence)")
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = expanded
    return PairTokens(start + placeholders, chosen_ids, chosen_labels, rejected_ids, rejected_labels)


def _answer_tokens(pair: PreferencePair, answer: str, template: str, tokenizer) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, labels on the final answer only, where the final answer's tokens start)."""
    rendered = templates.render(template, pair.conversation(answer), tokenizer)
    ids, labels = templates.tokenize_with_labels(rendered, tokenizer)
    supervised = np.flatnonzero(labels != templates.IGNORE_INDEX)
    # The final answer is the last unbroken run of supervised tokens: a user turn separates two answers.
    breaks = np.flatnonzero(np.diff(supervised) > 1)
    start = int(supervised[breaks[-1] + 1] if len(breaks) else supervised[0])
    labels[:start] = templates.IGNORE_INDEX  # earlier answers of a multi-turn prompt are context here
    return ids, labels, start


def read_preference_row(row: dict) -> PreferencePair:
    """One row of any layout above, checked and normalised; a `RowError` with its reason otherwise."""
    messages = prompt_messages(row)
    chosen, rejected = answer_text(row, "chosen"), answer_text(row, "rejected")
    names, video = formats.image_list(row), formats.video_of(row)
    chosen_turns = _normalised(messages, chosen, len(names), video)
    rejected_turns = _normalised(messages, rejected, len(names), video)
    chosen, rejected = chosen_turns[-1].text, rejected_turns[-1].text
    if chosen.strip() == rejected.strip():
        raise RowError("identical_answers", "the chosen and the rejected answer are the same text")
    return PreferencePair(str(row.get("id", "")), chosen_turns[:-1], names, video, chosen, rejected,
                          score(row, "chosen"), score(row, "rejected"))


def prompt_messages(row: dict) -> list[dict]:
    """The prompt as chat messages with string contents: a string is one user turn."""
    prompt = next((row[f] for f in PROMPT_FIELDS if row.get(f) is not None), None)
    if prompt is None:
        raise RowError("missing_field", "no prompt (`prompt`, or `question`)")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise RowError("malformed_prompt", f"prompt is {_kind(prompt)}, not a string or a list of messages")
    if not prompt:
        raise RowError("malformed_prompt", "prompt is an empty list of messages")
    return [_with_text_content(message, "malformed_prompt") for message in prompt]


def answer_text(row: dict, field: str) -> str:
    """`chosen` or `rejected` as text: a string, or a list of exactly one assistant message (TRL's layout)."""
    if row.get(field) is None:
        raise RowError("missing_field", f"no `{field}` answer")
    answer = row[field]
    if isinstance(answer, list):
        if len(answer) != 1:
            raise RowError("malformed_answer", f"{field} holds {len(answer)} messages, not one assistant message")
        message = _with_text_content(answer[0], "malformed_answer")
        role = message.get("role", message.get("from"))
        if formats.ROLE_ALIASES.get(role) != ASSISTANT:
            raise RowError("malformed_answer", f"{field} is a {role!r} message, not the assistant's")
        answer = message.get("content", message.get("value"))
    if not isinstance(answer, str):
        raise RowError("malformed_answer", f"{field} is {_kind(answer)}, not a string or an assistant message")
    if not answer.strip():
        raise RowError("empty_answer", f"{field} is empty")
    return answer


def score(row: dict, answer: str) -> float | None:
    """The answer's score when the row gives one (a finite number), else None."""
    value = next((row[f] for f in SCORE_FIELDS[answer] if row.get(f) is not None), None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError("malformed_score", f"{answer} score is {value!r}, not a finite number")
    return float(value)


def _normalised(messages: list[dict], answer: str, n_images: int, video) -> list[Turn]:
    conversation = [*messages, {"role": ASSISTANT, "content": answer}]
    return formats.normalise_conversation({"conversations": conversation}, n_images, video=video is not None)


def _with_text_content(message, reason: str) -> dict:
    """A chat message whose `content` parts list (TRL's vision layout) is joined into text with media tags."""
    if not isinstance(message, dict):
        raise RowError(reason, f"a message is {_kind(message)}, not an object")
    content = message.get("content")
    if not isinstance(content, list):
        return message  # a string, or `from`/`value`: formats.py reads and checks it
    return {**message, "content": "\n".join(_part_text(part, reason) for part in content)}


def _part_text(part, reason: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in PART_TAGS:
        return PART_TAGS[kind]
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise RowError(reason, f"a content part is {part!r:.80}, not text, image or video")


def _kind(value) -> str:
    return "missing" if value is None else type(value).__name__
