"""Rendered text and label masks of each template, pinned exactly."""
import numpy as np
import pytest

from llava_core.data import formats, templates
from llava_core.data.formats import RowError
from llava_core.model.chat_template import VICUNA_SYSTEM

ROW = {"id": "r1", "image": "a.png", "conversations": [
    {"from": "human", "value": "What colour is it?\n<image>"},  # tag after the text: normalised to the front
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "And the shape?"},
    {"from": "gpt", "value": "a circle"},
]}


@pytest.fixture(scope="module")
def tokenizer(tiny_dataset):
    from llava_core.model.processors import load_tokenizer

    return load_tokenizer(tiny_dataset["llm"])


def supervised_text(tokenizer, ids, labels):
    return tokenizer.decode(ids[labels != templates.IGNORE_INDEX])


def test_vicuna_v1_renders_the_official_format(tokenizer):
    """The export's chat template, through which training renders vicuna_v1, writes LLaVA's format exactly, after
    the BOS the official code's tokenizer adds (an engine rendering the chat adds none of its own)."""
    turns = formats.normalise_conversation(ROW, 1)
    rendered = templates.render_vicuna_v1(turns, tokenizer)
    assert not rendered.add_special_tokens
    assert rendered.text == (f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat colour is it? ASSISTANT: red</s>"
                             "USER: And the shape? ASSISTANT: a circle</s>")
    assert [rendered.text[s:e] for s, e in rendered.supervised] == [" red</s>", " a circle</s>"]


def test_vicuna_v1_mask_covers_exactly_the_answers(tokenizer):
    turns = formats.normalise_conversation(ROW, 1)
    ids, labels = templates.tokenize_with_labels(templates.render_vicuna_v1(turns, tokenizer), tokenizer)
    assert ids[0] == tokenizer.bos_token_id and labels[0] == templates.IGNORE_INDEX
    # Exactly the answer tokens and their </s> are supervised, each answer in one contiguous run.
    supervised = np.flatnonzero(labels != templates.IGNORE_INDEX)
    runs = np.split(supervised, np.flatnonzero(np.diff(supervised) != 1) + 1)
    assert [tokenizer.decode(ids[r]).strip() for r in runs] == ["red</s>", "a circle</s>"]
    assert (ids[runs[0][-1]], ids[runs[1][-1]]) == (tokenizer.eos_token_id, tokenizer.eos_token_id)


def test_plain_template_keeps_only_image_and_caption(tokenizer):
    row = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                                {"from": "gpt", "value": "a red circle on the left"}]}
    rendered = templates.render_plain(formats.normalise_conversation(row, 1), tokenizer.eos_token)
    assert rendered.text == "<image>a red circle on the left\n"
    ids, labels = templates.tokenize_with_labels(rendered, tokenizer)
    assert supervised_text(tokenizer, ids, labels) == "a red circle on the left\n"


def test_text_only_row_has_no_image_tokens(tokenizer):
    row = {"id": "t", "conversations": [{"from": "human", "value": "What is one plus one?"},
                                        {"from": "gpt", "value": "two"}]}
    turns = formats.normalise_conversation(row, 0)
    ids, labels = templates.tokenize_with_labels(templates.render_vicuna_v1(turns, tokenizer), tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id not in ids
    assert supervised_text(tokenizer, ids, labels).strip() == "two</s>"


def test_image_tokens_expand_and_are_never_supervised(tokenizer):
    turns = formats.normalise_conversation(ROW, 1)
    ids, labels = templates.tokenize_with_labels(templates.render_vicuna_v1(turns, tokenizer), tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    expanded, expanded_labels = templates.expand_image_tokens(ids, labels, image_id, [64])
    assert (expanded == image_id).sum() == 64 and len(expanded) == len(ids) + 63
    assert (expanded_labels[expanded == image_id] == templates.IGNORE_INDEX).all()


def test_each_image_expands_to_its_own_count_in_order():
    ids, labels = np.array([1, 9, 5, 9, 6]), np.array([-100, -100, -100, -100, 6])
    expanded, expanded_labels = templates.expand_image_tokens(ids, labels, 9, [3, 1])
    assert expanded.tolist() == [1, 9, 9, 9, 5, 9, 6] and expanded_labels.tolist()[-1] == 6
    with pytest.raises(RowError, match="image_tag_mismatch"):
        templates.expand_image_tokens(ids, labels, 9, [3])


def test_truncation_never_cuts_image_tokens():
    ids = np.array([1, 9, 9, 9, 5, 6, 7, 8])
    labels = np.array([-100, -100, -100, -100, -100, 6, 7, 8])
    cut_ids, cut_labels = templates.fit_to_length(ids, labels, 6, image_token_id=9, policy="truncate")
    assert cut_ids.tolist() == [1, 9, 9, 9, 5, 6] and cut_labels.tolist()[-1] == 6
    with pytest.raises(RowError, match="too_long"):
        templates.fit_to_length(ids, labels, 3, image_token_id=9, policy="truncate")
    with pytest.raises(RowError, match="too_long"):
        templates.fit_to_length(ids, labels, 6, image_token_id=9, policy="reject")


@pytest.mark.parametrize("conversations, reason", [
    ([], "empty_conversation"),
    ([{"from": "human", "value": "<image>\nhi"}], "empty_conversation"),
    ([{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}, {"from": "human", "value": "<image>"},
      {"from": "human", "value": "z"}], "roles_out_of_order"),
    ([{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "y"}], "malformed_conversation"),
    ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "y"}], "image_tag_mismatch"),
])
def test_bad_conversations_are_rejected_with_their_reason(conversations, reason):
    with pytest.raises(RowError) as error:
        formats.normalise_conversation({"conversations": conversations}, 1)
    assert error.value.reason == reason


def test_role_content_keys_and_leading_assistant_turn():
    row = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "<image>\nq"},
                        {"role": "assistant", "content": "a"}]}
    turns = formats.normalise_conversation(row, 1)
    assert [(t.role, t.text) for t in turns] == [("user", "<image>\nq"), ("assistant", "a")]


def test_export_chat_template_renders_the_training_prompt(tiny_llava_dir, tokenizer):
    """The export ships the template training rendered with; from a client's content parts it renders the training
    text up to the answer being generated."""
    from transformers import AutoProcessor

    from llava_core.model.chat_template import VICUNA_V1_CHAT_TEMPLATE

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    assert processor.chat_template == VICUNA_V1_CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                {"role": "user", "content": [{"type": "text", "text": "And the shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    turns = formats.normalise_conversation(ROW, 1)
    trained = templates.render_vicuna_v1(turns, tokenizer).text
    # The inference prompt is the training text up to the position of the answer being generated.
    assert trained.startswith(prompt) and trained[len(prompt):] == " a circle</s>"


# A ChatML-style template (the shape of Qwen's), written here: nothing comes from the hub.
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_dataset):
    from llava_core.model.processors import load_tokenizer

    tokenizer = load_tokenizer(tiny_dataset["llm"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def supervised_runs(tokenizer, ids, labels):
    supervised = np.flatnonzero(labels != templates.IGNORE_INDEX)
    runs = np.split(supervised, np.flatnonzero(np.diff(supervised) != 1) + 1)
    return [tokenizer.decode(ids[r]) for r in runs if len(r)]


def test_chat_template_renders_the_tokenizers_template_and_masks_answers(chatml_tokenizer):
    tok = chatml_tokenizer
    rendered = templates.render("chat_template", formats.normalise_conversation(ROW, 1), tok)
    assert rendered.text == (f"{tok.bos_token}<|im_start|>user\n<image>\nWhat colour is it?<|im_end|>\n"
                             "<|im_start|>assistant\nred<|im_end|>\n"
                             "<|im_start|>user\nAnd the shape?<|im_end|>\n"
                             "<|im_start|>assistant\na circle<|im_end|>\n")
    # The answer and its end-of-turn token; not the newline after it, not the role headers.
    assert [rendered.text[s:e] for s, e in rendered.supervised] == ["red<|im_end|>", "a circle<|im_end|>"]
    ids, labels = templates.tokenize_with_labels(rendered, tok)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # the template's BOS only, not a second one
    assert (ids == tok.convert_tokens_to_ids("<image>")).sum() == 1
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert supervised_runs(tok, ids, labels) == ["red<|im_end|>", "a circle<|im_end|>"]
    assert (ids == im_end).sum() == 4 and (labels == im_end).sum() == 2  # user turns' end tokens are not learned


def test_chat_template_text_only_row(chatml_tokenizer):
    tok = chatml_tokenizer
    row = {"conversations": [{"from": "human", "value": "What is one plus one?"}, {"from": "gpt", "value": "two"}]}
    rendered = templates.render("chat_template", formats.normalise_conversation(row, 0), tok)
    assert rendered.text == (f"{tok.bos_token}<|im_start|>user\nWhat is one plus one?<|im_end|>\n"
                             "<|im_start|>assistant\ntwo<|im_end|>\n")
    ids, labels = templates.tokenize_with_labels(rendered, tok)
    assert supervised_runs(tok, ids, labels) == ["two<|im_end|>"]


def test_chat_template_that_rewrites_history_is_rejected(chatml_tokenizer):
    """A template that renders earlier turns differently once later ones exist cannot give a trustworthy mask."""
    tok = chatml_tokenizer
    rewriting = ("{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}<|im_start|>final\n"
                 "{% else %}<|im_start|>{{ m['role'] }}\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    original, tok.chat_template = tok.chat_template, rewriting
    try:
        with pytest.raises(RowError) as error:
            templates.render("chat_template", formats.normalise_conversation(ROW, 1), tok)
        assert error.value.reason == "chat_template_mismatch"
    finally:
        tok.chat_template = original


def test_vicuna_v1_multi_turn_mask_and_plain_text_through_render(tokenizer):
    """`render` dispatches by name and the masks of vicuna_v1 cover both answers of a multi-turn row."""
    ids, labels = templates.tokenize_with_labels(
        templates.render("vicuna_v1", formats.normalise_conversation(ROW, 1), tokenizer), tokenizer)
    assert [r.strip() for r in supervised_runs(tokenizer, ids, labels)] == ["red</s>", "a circle</s>"]
    with pytest.raises(ValueError, match="unknown template"):
        templates.render("llama_2", [], tokenizer)
