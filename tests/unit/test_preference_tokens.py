"""Both answers of a preference pair tokenized after the same prompt (llava_core/data/preference.py `tokenize_pair`),
with the tiny Vicuna stand-in's tokenizer and the vicuna_v1 template the instruct stage uses: the prompt's tokens are
shared to the token, only the final answer is supervised, the image tag becomes its placeholders, and the pairs that
cannot be trained on are rejected with their reason."""
from __future__ import annotations

import numpy as np
import pytest

from llava_core.data import templates
from llava_core.data.formats import RowError
from llava_core.data.preference import read_preference_row, tokenize_pair
from llava_core.model.tokens import IMAGE_TOKEN

ROW = {"id": "p1", "prompt": "What is in the picture?", "image": "scene.png",
       "chosen": "A red circle.", "rejected": "A blue square and a dog."}
PLACEHOLDERS = 16  # the tiny CLIP stand-in's features a view


@pytest.fixture(scope="module")
def tokenizer(tiny_dataset):
    from llava_core.model.processors import load_tokenizer

    return load_tokenizer(tiny_dataset["llm"])


def tokens(tokenizer, row=ROW, max_length=512):
    pair = read_preference_row(row)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return tokenize_pair(pair, "vicuna_v1", tokenizer, image_id, [PLACEHOLDERS], max_length), image_id


def supervised(tokenizer, ids, labels) -> str:
    return tokenizer.decode(ids[labels != templates.IGNORE_INDEX])


def test_both_answers_follow_the_same_prompt_tokens_and_only_the_answer_is_supervised(tokenizer):
    pair, image_id = tokens(tokenizer)
    start = pair.prompt_length
    assert np.array_equal(pair.chosen_ids[:start], pair.rejected_ids[:start])
    assert int(np.sum(pair.chosen_ids[:start] == image_id)) == PLACEHOLDERS  # the tag became the image's placeholders
    for ids, labels, answer in ((pair.chosen_ids, pair.chosen_labels, ROW["chosen"]),
                                (pair.rejected_ids, pair.rejected_labels, ROW["rejected"])):
        assert (labels[:start] == templates.IGNORE_INDEX).all()
        assert (labels[start:] != templates.IGNORE_INDEX).all()  # the answer and its end-of-turn token, no more
        assert supervised(tokenizer, ids, labels).strip() == f"{answer}</s>"


def test_a_multi_turn_prompt_supervises_the_final_answer_alone(tokenizer):
    row = {"id": "p2", "image": "scene.png",
           "prompt": [{"role": "user", "content": "<image>\nHow many shapes?"},
                      {"role": "assistant", "content": "Two."}, {"role": "user", "content": "Which colours?"}],
           "chosen": "Red and green.", "rejected": "Purple and gold."}
    pair, _ = tokens(tokenizer, row)
    assert "Two." in tokenizer.decode(pair.chosen_ids[:pair.prompt_length])  # context, not a target
    assert supervised(tokenizer, pair.chosen_ids, pair.chosen_labels).strip() == "Red and green.</s>"
    assert supervised(tokenizer, pair.rejected_ids, pair.rejected_labels).strip() == "Purple and gold.</s>"


def test_answers_that_differ_only_in_surrounding_space_are_identical_answers(tokenizer):
    with pytest.raises(RowError) as caught:
        tokens(tokenizer, {**ROW, "rejected": ROW["chosen"] + "  "})  # vicuna_v1 trains on trimmed turns
    assert caught.value.reason == "identical_answers"


def test_a_pair_whose_longer_sequence_passes_max_length_is_too_long_never_cut(tokenizer):
    pair, _ = tokens(tokenizer)
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    assert tokens(tokenizer, max_length=longest)[0].rejected_ids.size == len(pair.rejected_ids)
    with pytest.raises(RowError) as caught:
        tokens(tokenizer, max_length=longest - 1)
    assert caught.value.reason == "too_long"
