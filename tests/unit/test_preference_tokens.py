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


def tokens(tokenizer, row=ROW, max_length=512, placeholders=PLACEHOLDERS):
    pair = read_preference_row(row)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return tokenize_pair(pair, "vicuna_v1", tokenizer, image_id, [placeholders], max_length), image_id


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


def test_prepare_writes_a_pair_as_one_row_with_both_sequences_and_counts_its_rejects(tiny_dataset):
    """A `preference` dataset's row through RowPreparer: the chosen sequence in `input_ids`/`labels`, the rejected
    one in `rejected_*`, the image once, `length` both sequences; a pair with identical answers and one with a
    missing image are rejects with their reasons, as any row's problems are."""
    import json

    from llava_core.data.rows import RowPreparer

    preparer = RowPreparer(tiny_dataset["vision"], tiny_dataset["llm"],
                           {"template": "vicuna_v1", "max_length": 512, "kind": "preference"})
    image = json.load(open(tiny_dataset["instruct"]))[0]["image"]
    row = {**ROW, "image": image}
    out = preparer.prepare(json.dumps(row), tiny_dataset["image_folder"])
    assert out["reason"] == "", out["detail"]
    views = preparer.images.prepare([open(f"{tiny_dataset['image_folder']}/{image}", "rb").read()]).token_counts
    expected, image_id = tokens(preparer.tokenizer, row, placeholders=views[0])
    assert out["input_ids"] == expected.chosen_ids.tolist() and out["labels"] == expected.chosen_labels.tolist()
    assert out["rejected_input_ids"] == expected.rejected_ids.tolist()
    assert out["rejected_labels"] == expected.rejected_labels.tolist()
    assert out["input_ids"].count(image_id) == views[0] == out["image_tokens"][0] > 0
    assert out["length"] == len(expected.chosen_ids) + len(expected.rejected_ids)
    assert out["num_images"] == 1 and out["pixel_values"]["uint8"]  # one image, stored once for both answers

    same = preparer.prepare(json.dumps({**row, "rejected": row["chosen"]}), tiny_dataset["image_folder"])
    missing = preparer.prepare(json.dumps({**row, "image": "nowhere.png"}), tiny_dataset["image_folder"])
    assert same["reason"] == "identical_answers" and missing["reason"] == "image_missing"
    assert same["rejected_input_ids"] == [] and same["length"] == 0


def test_a_stage_starting_from_a_checkpoint_gets_its_pairs_prepared_with_the_checkpoints_processor(tiny_dataset,
                                                                                                   tmp_path):
    """`preference.init_from` names a model whose tokenizer gave `<image>` another id than the base LLM's tokenizer
    with `<image>` added does (here a token added before it, as checkpoints converted with other added tokens
    have): prepare's pairs carry the checkpoint's id, the one its config and its training load read."""
    import json
    import shutil

    import torch
    from transformers import AutoTokenizer

    from llava_core.data.rows import RowPreparer
    from llava_core.model.build import assemble
    from llava_core.train.save import save_hf_model

    other_llm = str(tmp_path / "llm")
    shutil.copytree(tiny_dataset["llm"], other_llm)
    tokenizer = AutoTokenizer.from_pretrained(other_llm)
    tokenizer.add_tokens(["<extra_0>"], special_tokens=True)
    tokenizer.save_pretrained(other_llm)
    torch.manual_seed(0)
    model, processor = assemble("llava", tiny_dataset["vision"], other_llm)
    checkpoint = str(tmp_path / "checkpoint")
    save_hf_model(model, processor, checkpoint, torch.float32)
    checkpoint_image_id = json.load(open(f"{checkpoint}/config.json"))["image_token_index"]  # the hub's key

    settings = {"template": "vicuna_v1", "max_length": 512, "kind": "preference"}
    image = json.load(open(tiny_dataset["instruct"]))[0]["image"]
    row = json.dumps({**ROW, "image": image})
    base = RowPreparer(tiny_dataset["vision"], tiny_dataset["llm"], settings)
    started = RowPreparer(tiny_dataset["vision"], tiny_dataset["llm"], {**settings, "checkpoint": checkpoint})
    ours, theirs = (p.prepare(row, tiny_dataset["image_folder"]) for p in (base, started))
    assert started.image_token_id == checkpoint_image_id == base.image_token_id + 1
    assert theirs["input_ids"].count(checkpoint_image_id) == theirs["image_tokens"][0] == ours["image_tokens"][0] > 0
    assert ours["input_ids"].count(checkpoint_image_id) == 0  # the base tokenizer's ids would not fit the model
    assert started.tokenizer.decode(theirs["rejected_input_ids"]) == base.tokenizer.decode(ours["rejected_input_ids"])
    assert theirs["pixel_values"] == ours["pixel_values"]  # the same tower's crops
