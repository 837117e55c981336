"""Answers start where generation starts: for every template and both tokenizer families, the token ids of the
inference prompt (the chat template rendered with `add_generation_prompt=True` for the conversation so far, tokenized
as the endpoint tokenizes it) are exactly a prefix of the training ids, and the supervised ids are exactly the tokens
after that prefix up to and including the end-of-turn token."""
import numpy as np
import pytest

from llava_core.data import formats, templates
from llava_core.model.chat_template import VICUNA_V1_CHAT_TEMPLATE

# Digits (LLaMA splits them and writes the space as its own `▁`), rare words (many pieces), words that merge with
# the space before them and words that do not (punctuation first).
ANSWERS = ["4", "1234", "zygomorphic", "red", "(circle)", "3.5 metres", "x-ray"]
QUESTIONS = ["How many?", "Which year?", "What word?", "What colour?", "What shape?", "How far?", "What kind?"]
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
          "{% for part in m['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}"
          "{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["a red circle on the left", "the answer is 42", "How many shapes are there?", "What colour is it?"]


def with_image_and_chat_tokens(tokenizer):
    from llava_core.model.tokens import IMAGE_TOKEN, PAD_TOKEN

    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"],
                                  "pad_token": PAD_TOKEN})
    return tokenizer


@pytest.fixture(scope="module", params=["llama_sentencepiece", "byte_level_bpe"])
def tokenizer(request, tiny_dataset):
    if request.param == "llama_sentencepiece":  # the Vicuna stand-in's tokenizer.model, loaded as transformers does
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_dataset["llm"])
        assert tok.convert_ids_to_tokens(tok(" 4", add_special_tokens=False)["input_ids"]) == ["▁", "4"]
    else:
        from llava_core.quickstart.standins import byte_level_bpe_tokenizer

        tok = byte_level_bpe_tokenizer(CORPUS * 20, vocab_size=400)
    return with_image_and_chat_tokens(tok)


def multi_turn_row(answers: list[str]) -> dict:
    conversations = []
    for k, (question, answer) in enumerate(zip(QUESTIONS, answers)):
        conversations += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + question},
                          {"from": "gpt", "value": answer}]
    return {"id": "r", "image": "a.png", "conversations": conversations}


def inference_messages(turns) -> list[dict]:
    """The conversation as a client sends it to the endpoint: the image as a content part, text without its tag."""
    messages = []
    for turn in turns:
        parts = [{"type": "image"}] if formats.IMAGE_TAG in turn.text else []
        parts.append({"type": "text", "text": turn.text.replace(formats.IMAGE_TAG + "\n", "").strip()})
        messages.append({"role": turn.role, "content": parts})
    return messages


def inference_prompt_ids(tokenizer, template: str, messages: list[dict]) -> list[int]:
    if template == "plain":  # stage 1: the prompt is the image alone
        return tokenizer("<image>")["input_ids"]
    chat_template = VICUNA_V1_CHAT_TEMPLATE if template == "vicuna_v1" else CHATML
    prompt = tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                           tokenize=False, eos_token=tokenizer.eos_token)
    # Tokenized as transformers' and vLLM's chat do: the templates write the BOS themselves, nothing is added.
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def end_of_turn_id(tokenizer, template: str) -> int:
    if template == "chat_template":
        return tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer.eos_token_id


@pytest.mark.parametrize("template", ["vicuna_v1", "chat_template", "plain"])
def test_prompt_tokens_are_a_prefix_and_exactly_the_answers_are_learned(tokenizer, template):
    tokenizer.chat_template = CHATML
    rows = [multi_turn_row([answer]) for answer in ANSWERS] if template == "plain" else [multi_turn_row(ANSWERS)]
    for row in rows:
        turns = formats.normalise_conversation(row, 1)
        ids, labels = templates.tokenize_with_labels(templates.render(template, turns, tokenizer), tokenizer)
        expected = np.full_like(labels, templates.IGNORE_INDEX)
        answers = [k for k, turn in enumerate(turns) if turn.role == formats.ASSISTANT]
        for k in answers:
            prompt = inference_prompt_ids(tokenizer, template, inference_messages(turns[:k]))
            assert ids[:len(prompt)].tolist() == prompt, f"answer {k}: the prompt's tokens are not a prefix"
            # The answer runs from the first token after the prompt through the end-of-turn token.
            eot = end_of_turn_id(tokenizer, template) if template != "plain" else None
            end = (len(prompt) + ids[len(prompt):].tolist().index(eot) + 1) if eot is not None else len(ids)
            expected[len(prompt):end] = ids[len(prompt):end]
            answer_text = tokenizer.decode(ids[len(prompt):end], skip_special_tokens=True)
            assert answer_text.strip() == turns[k].text.strip()
        assert labels.tolist() == expected.tolist()


def test_vicuna_v1_labels_are_the_chat_templates_assistant_mask(tokenizer):
    """vicuna_v1 has one definition, the chat template the export ships: rendered for the client's messages with
    `return_assistant_tokens_mask`, its generation markers cover exactly the tokens training learns."""
    turns = formats.normalise_conversation(multi_turn_row(ANSWERS), 1)
    ids, labels = templates.tokenize_with_labels(templates.render("vicuna_v1", turns, tokenizer), tokenizer)
    chat = tokenizer.apply_chat_template(inference_messages(turns), chat_template=VICUNA_V1_CHAT_TEMPLATE,
                                         tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    # apply_chat_template adds no special tokens: the template writes the BOS itself, as training's ids start with it.
    assert ids.tolist() == chat["input_ids"] and ids[0] == tokenizer.bos_token_id
    learned = (labels != templates.IGNORE_INDEX).astype(int).tolist()
    assert learned == chat["assistant_masks"] and sum(learned) > len(ANSWERS)


def test_the_first_generated_token_of_a_numeric_answer_is_learned(tiny_dataset):
    """With the LLaMA-style tokenizer, ` 4` is `▁` then `4`: both must be supervised (a mask from the answer's
    characters would leave `▁` unlearned, and the model would never emit it after `ASSISTANT:`)."""
    from llava_core.model.processors import load_tokenizer

    tok = load_tokenizer(tiny_dataset["llm"])
    turns = formats.normalise_conversation(multi_turn_row(["4"]), 1)
    ids, labels = templates.tokenize_with_labels(templates.render("vicuna_v1", turns, tok), tok)
    learned = tok.convert_ids_to_tokens(ids[labels != templates.IGNORE_INDEX].tolist())
    assert learned == ["▁", "4", "</s>"]


def test_a_prompt_that_does_not_tokenize_as_a_prefix_is_rejected(tiny_dataset):
    """A template whose answer span starts inside a token cannot be masked truthfully: a counted reject."""
    from llava_core.model.processors import load_tokenizer

    tok = load_tokenizer(tiny_dataset["llm"])
    text = "<image>red circle\n"
    split_inside_a_word = templates.Rendered(text, [(len("<image>re"), len(text))])
    with pytest.raises(formats.RowError) as error:
        templates.tokenize_with_labels(split_inside_a_word, tok)
    assert error.value.reason == "tokenization_mismatch"
