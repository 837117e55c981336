"""Render a conversation in a training template and compute its label mask from token offsets.

Rendering returns the full text plus the character spans the model must learn to produce (assistant answers and their
end-of-turn token). Tokenizing the full text once with offsets then marks every token that overlaps a span: the ids
are the ones inference sees, and the mask cannot disagree with them (the official code re-tokenizes pieces and
silently zeroes samples where the counts differ: "tokenization mismatch").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llava_core.data.formats import ASSISTANT, IMAGE_TAG, RowError, Turn
from llava_core.model.chat_template import VICUNA_SYSTEM

IGNORE_INDEX = -100
TEMPLATES = ("plain", "vicuna_v1", "chat_template")


@dataclass
class Rendered:
    text: str
    supervised: list[tuple[int, int]]  # [start, end) character spans
    add_special_tokens: bool = True  # False when the template writes its own BOS (chat templates do)


def render_plain(turns: list[Turn], eos: str) -> Rendered:
    """Stage-1 format: the instruction is discarded; `<image>` + caption + newline, caption and newline supervised."""
    if len(turns) != 2 or turns[0].text.count(IMAGE_TAG) != 1:
        raise RowError("template_mismatch", "the plain template needs one image and one caption turn")
    answer = turns[1].text.strip() + "\n"
    return Rendered(IMAGE_TAG + answer, [(len(IMAGE_TAG), len(IMAGE_TAG) + len(answer))])


def render_vicuna_v1(turns: list[Turn], eos: str, system: str = VICUNA_SYSTEM) -> Rendered:
    """`{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`."""
    text, spans = system + " ", []
    for turn in turns:
        if turn.role == ASSISTANT:
            text += "ASSISTANT: "
            answer = turn.text.strip() + eos
            spans.append((len(text), len(text) + len(answer)))
            text += answer
        else:
            text += f"USER: {turn.text.strip()} "
    return Rendered(text, spans)


def render_chat_template(turns: list[Turn], tokenizer) -> Rendered:
    """The tokenizer's own Jinja chat template (LLaMA-3, Qwen, Mistral bases), rendered turn by turn.

    For the k-th answer, the conversation up to its question rendered with the generation prompt is where the answer
    starts, and the conversation up to the answer is where it ends: the span between them is the answer and its
    end-of-turn token (trailing whitespace after that token is not supervised). Both renderings must be prefixes of
    the full text; a template that rewrites earlier turns (some hide past reasoning) breaks that and the row is
    rejected as `chat_template_mismatch` rather than trained with a wrong mask.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat_template': the tokenizer has no chat_template; use vicuna_v1 or plain, or "
                         "a base model whose tokenizer_config.json carries one")
    messages = [{"role": t.role, "content": t.text} for t in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, turn in enumerate(turns):
        if turn.role != ASSISTANT:
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (text.startswith(prompt) and text.startswith(upto) and len(prompt) < len(upto.rstrip())):
            raise RowError("chat_template_mismatch", f"rendering up to turn {k} is not a prefix of the conversation")
        spans.append((len(prompt), len(upto.rstrip())))
    return Rendered(text, spans, add_special_tokens=False)


def render(template: str, turns: list[Turn], tokenizer) -> Rendered:
    if template == "plain":
        return render_plain(turns, tokenizer.eos_token)
    if template == "vicuna_v1":
        return render_vicuna_v1(turns, tokenizer.eos_token)
    if template == "chat_template":
        return render_chat_template(turns, tokenizer)
    raise ValueError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")


def tokenize_with_labels(rendered: Rendered, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered text and labels (-100 outside the supervised spans)."""
    encoding = tokenizer(rendered.text, return_offsets_mapping=True, add_special_tokens=rendered.add_special_tokens)
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    for i, (start, end) in enumerate(encoding["offset_mapping"]):
        if end > start and any(start < s_end and end > s_start for s_start, s_end in rendered.supervised):
            labels[i] = ids[i]
    return ids, labels


def expand_image_tokens(ids: np.ndarray, labels: np.ndarray, image_token_id: int, image_seq_length: int):
    """Replace each image token by the `image_seq_length` placeholders the model fills with image features."""
    positions = np.flatnonzero(ids == image_token_id)
    if len(positions) == 0:
        return ids, labels
    repeats = np.where(ids == image_token_id, image_seq_length, 1)
    return np.repeat(ids, repeats), np.repeat(labels, repeats)


def fit_to_length(ids: np.ndarray, labels: np.ndarray, max_length: int, image_token_id: int, policy: str):
    """Enforce `max_length`: reject, or cut text from the end (never through image tokens)."""
    if len(ids) <= max_length:
        return ids, labels
    if policy != "truncate":
        raise RowError("too_long", f"{len(ids)} tokens > max_length {max_length}")
    last_image = int(np.flatnonzero(ids == image_token_id).max(initial=-1))
    if last_image >= max_length:
        raise RowError("too_long", f"image tokens end at {last_image + 1} > max_length {max_length}")
    ids, labels = ids[:max_length], labels[:max_length]
    if not (labels != IGNORE_INDEX).any():
        raise RowError("too_long", "no supervised token left after truncation")
    return ids, labels
