"""Render a conversation in a training template and compute its label mask at the tokens where generation starts.

Rendering returns the full text plus, for every assistant answer, the character span from the end of the inference
prompt (the conversation so far, as the export's chat template renders it with the generation prompt) to the end of
the answer's end-of-turn token. `vicuna_v1` and `chat_template` rows are rendered by that Jinja template itself, turn
by turn, so the text and the spans come from the one definition the export ships; only `plain` (stage 1) is written
here. Tokenizing then supervises exactly the tokens after the prompt's own tokens up to the tokens of the text through
the answer: with a LLaMA tokenizer ` 4` after `ASSISTANT:` is two tokens (`▁`, `4`), and the `▁` is the first token
the model must generate, so it must be learned. A row whose prompt tokens are not a prefix of its own tokens has no
trustworthy mask and is rejected (`tokenization_mismatch`), never trained silently with a wrong one (the official
code's "tokenization mismatch" zeroes such samples' loss without a word).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llava_core.data.formats import ASSISTANT, IMAGE_TAG, VIDEO_TAG, RowError, Turn
from llava_core.model.chat_template import VICUNA_V1_CHAT_TEMPLATE
from llava_core.schema import TEMPLATES

IGNORE_INDEX = -100


@dataclass
class Rendered:
    text: str
    supervised: list[tuple[int, int]]  # per answer: [end of its inference prompt, end of its end-of-turn token)
    add_special_tokens: bool = True  # False when the template writes its own BOS (vicuna_v1's does)


def render_plain(turns: list[Turn], eos: str) -> Rendered:
    """Stage-1 format: the instruction is discarded; `<image>` + caption + newline, caption and newline supervised
    (the prompt is `<image>` alone)."""
    tag = VIDEO_TAG if VIDEO_TAG in turns[0].text else IMAGE_TAG  # a video row's tag is `<video>` by now
    if len(turns) != 2 or turns[0].text.count(tag) != 1:
        raise RowError("template_mismatch", "the plain template needs one image (or video) and one caption turn")
    answer = turns[1].text.strip() + "\n"
    return Rendered(tag + answer, [(len(tag), len(tag) + len(answer))])


def render_vicuna_v1(turns: list[Turn], tokenizer) -> Rendered:
    """`{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`, rendered by the template
    the export ships (`VICUNA_V1_CHAT_TEMPLATE`, the format's only definition).

    The LLaMA/Vicuna tokenizer has no chat template of its own, so this one is passed in rather than set on the
    tokenizer. It writes the BOS itself (as vLLM and every engine that renders a chat expects), so tokenizing adds
    none. The spans come from renders with and without the generation prompt, not from the template's
    `{% generation %}` markers: those renders are the prompts inference sees, and `tokenize_with_labels` rejects a
    row whose prompt tokens are not a prefix (a mask from the markers' character offsets would take a token that
    straddles the boundary silently); a test pins the markers' mask to the labels this gives.
    """
    messages = [{"role": t.role, "content": t.text.strip()} for t in turns]  # vicuna_v1 trains on trimmed turns
    return render_turn_by_turn(messages, tokenizer, VICUNA_V1_CHAT_TEMPLATE, add_special_tokens=False)


def render_chat_template(turns: list[Turn], tokenizer) -> Rendered:
    """The tokenizer's own Jinja chat template (LLaMA-3, Qwen, Mistral bases); it writes its own BOS."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat_template': the tokenizer has no chat_template; use vicuna_v1 or plain, or "
                         "a base model whose tokenizer_config.json carries one")
    messages = [{"role": t.role, "content": t.text} for t in turns]
    return render_turn_by_turn(messages, tokenizer, None, add_special_tokens=False)


def render_turn_by_turn(messages: list[dict], tokenizer, chat_template: str | None,
                        add_special_tokens: bool) -> Rendered:
    """A conversation rendered by a Jinja chat template (`None`: the tokenizer's own), turn by turn.

    For the k-th answer, the conversation up to its question rendered with the generation prompt is where the answer
    starts, and the conversation up to the answer is where it ends: the span between them is the answer and its
    end-of-turn token (trailing whitespace after that token is not supervised). Both renderings must be prefixes of
    the full text; a template that rewrites earlier turns (some hide past reasoning) breaks that and the row is
    rejected as `chat_template_mismatch` rather than trained with a wrong mask.
    """
    def apply(upto: int, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages[:upto], chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = apply(len(messages))
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        prompt, upto = apply(k, generation_prompt=True), apply(k + 1)
        if not (text.startswith(prompt) and text.startswith(upto) and len(prompt) < len(upto.rstrip())):
            raise RowError("chat_template_mismatch", f"rendering up to turn {k} is not a prefix of the conversation")
        spans.append((len(prompt), len(upto.rstrip())))
    return Rendered(text, spans, add_special_tokens)


def render(template: str, turns: list[Turn], tokenizer) -> Rendered:
    if template == "plain":
        return render_plain(turns, tokenizer.eos_token)
    if template == "vicuna_v1":
        return render_vicuna_v1(turns, tokenizer)
    if template == "chat_template":
        return render_chat_template(turns, tokenizer)
    raise ValueError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")


def tokenize_with_labels(rendered: Rendered, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered text and labels: per answer, the tokens after those of its inference prompt up to
    those of the text through its end-of-turn token; -100 everywhere else."""
    cuts = [cut for span in rendered.supervised for cut in span]
    # One batched call: the full text and each prompt / through-the-answer prefix (tokenized in parallel in Rust).
    encoded = tokenizer([rendered.text] + [rendered.text[:cut] for cut in cuts],
                        add_special_tokens=rendered.add_special_tokens)["input_ids"]
    ids = np.asarray(encoded[0], dtype=np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    for k in range(len(rendered.supervised)):
        prompt, through = encoded[1 + 2 * k], encoded[2 + 2 * k]
        if not (_is_prefix(prompt, ids) and _is_prefix(through, ids)) or len(through) <= len(prompt):
            raise RowError("tokenization_mismatch",
                           f"answer {k + 1}: the tokens of its prompt or of the text through it are not a prefix of "
                           "the row's tokens, so no mask would match what inference sees")
        labels[len(prompt):len(through)] = ids[len(prompt):len(through)]
    return ids, labels


def _is_prefix(prefix: list[int], ids: np.ndarray) -> bool:
    return len(prefix) <= len(ids) and np.array_equal(ids[:len(prefix)], prefix)


def expand_image_tokens(ids: np.ndarray, labels: np.ndarray, image_token_id: int, counts: list[int],
                        medium: str = "image"):
    """Replace the k-th image token by the `counts[k]` placeholders the model fills with that image's features;
    with the video token and `medium="video"`, the same for a video (OneVision: `counts` is [] or [one count])."""
    positions = np.flatnonzero(ids == image_token_id)
    if len(positions) != len(counts):
        raise RowError("image_tag_mismatch", f"{len(positions)} {medium} tokens after tokenizing for {len(counts)} "
                                             f"{medium}s")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[positions] = counts
    return np.repeat(ids, repeats), np.repeat(labels, repeats)


def fit_to_length(ids: np.ndarray, labels: np.ndarray, max_length: int, image_token_id, policy: str):
    """Enforce `max_length`: reject, or cut text from the end (never through image tokens; `image_token_id` may be
    a tuple of ids: the image and video tokens)."""
    if len(ids) <= max_length:
        return ids, labels
    if policy != "truncate":
        raise RowError("too_long", f"{len(ids)} tokens > max_length {max_length}")
    last_image = int(np.flatnonzero(np.isin(ids, image_token_id)).max(initial=-1))
    if last_image >= max_length:
        raise RowError("too_long", f"image tokens end at {last_image + 1} > max_length {max_length}")
    ids, labels = ids[:max_length], labels[:max_length]
    if not (labels != IGNORE_INDEX).any():
        raise RowError("too_long", "no supervised token left after truncation")
    return ids, labels
