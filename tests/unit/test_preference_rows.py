"""Preference rows (llava_core/data/preference.py): LLaVA-NeXT's DPO rows and hub rows in TRL's layout, read into one
form, and each way a row can be wrong rejected with its reason."""
from __future__ import annotations

import json

import pytest

from llava_core.data.formats import ASSISTANT, USER, RowError
from llava_core.data.preference import read_preference_row
from llava_core.data.sources import _split_inline_images


def llava_next_row(**changes) -> dict:
    """A row as LLaVA-NeXT's scripts/archived/dpo_data_info.py writes them (VLFeedback converted)."""
    row = {"id": "vlf-17", "prompt": "What is on the table?", "answer": "", "image": "silkie_dpo/vlf-17.jpg",
           "chosen": "A red cube.", "rejected": "A blue sphere and a dog.", "chosen_score": 5, "rejected_score": 2}
    return {**row, **changes}


def hub_row(**changes) -> dict:
    """A row as HuggingFaceH4/rlaif-v_formatted has it (TRL's examples/datasets/rlaif-v.py), after sources.py moved
    its inline image into `image` names beside the bytes."""
    row = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
           "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Two green cones."}]}],
           "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Three purple stars."}]}],
           "images": [{"bytes": b"\x89PNG...", "path": None}]}
    row = {**row, **changes}
    text, inline = _split_inline_images(row)
    assert inline == [b"\x89PNG..."] or "images" not in changes
    return json.loads(text)


def rejection(row: dict) -> RowError:
    with pytest.raises(RowError) as caught:
        read_preference_row(row)
    return caught.value


def test_llava_next_row():
    pair = read_preference_row(llava_next_row())
    assert pair.id == "vlf-17" and pair.images == ["silkie_dpo/vlf-17.jpg"] and pair.video is None
    # its loader's rule: the one image tag first, on its own line
    assert [(t.role, t.text) for t in pair.prompt] == [(USER, "<image>\nWhat is on the table?")]
    assert (pair.chosen, pair.rejected) == ("A red cube.", "A blue sphere and a dog.")
    assert (pair.chosen_score, pair.rejected_score) == (5.0, 2.0)


def test_llava_next_row_with_the_tag_anywhere_and_no_scores():
    row = llava_next_row(prompt="Look: <image> what is on the table?")
    del row["chosen_score"], row["rejected_score"]
    pair = read_preference_row(row)
    assert pair.prompt[0].text == "<image>\nLook: what is on the table?"
    assert pair.chosen_score is None and pair.rejected_score is None


def test_llava_next_video_row():
    """LLaVA-NeXT-Video's DPO rows write `<image>` for the video: it becomes `<video>`."""
    row = llava_next_row(prompt="<image>\nWhat happens?", video="clips/v1.mp4")
    del row["image"]
    pair = read_preference_row(row)
    assert pair.video == "clips/v1.mp4" and pair.images == []
    assert pair.prompt[0].text == "<video>\nWhat happens?"


def test_text_only_row():
    row = llava_next_row()
    del row["image"]
    pair = read_preference_row(row)
    assert pair.images == [] and pair.prompt[0].text == "What is on the table?"


def test_hub_row_with_message_lists_and_inline_image():
    pair = read_preference_row(hub_row())
    assert pair.images == ["inline-0"]
    assert [(t.role, t.text) for t in pair.prompt] == [(USER, "<image>\nDescribe it.")]
    assert (pair.chosen, pair.rejected) == ("Two green cones.", "Three purple stars.")
    assert pair.chosen_score is None


def test_hub_row_with_string_contents_and_plain_strings():
    row = hub_row(prompt=[{"role": "user", "content": "<image>Describe it."}], chosen="Two green cones.",
                  rejected=[{"role": "assistant", "content": "Three purple stars."}])
    pair = read_preference_row(row)
    assert pair.prompt[0].text == "<image>\nDescribe it."
    assert (pair.chosen, pair.rejected) == ("Two green cones.", "Three purple stars.")


def test_rlaif_v_raw_row_names_the_prompt_question():
    row = {"question": "Who is there?", "chosen": "Nobody.", "rejected": "A man in a hat.",
           "image": {"bytes": b"jpeg", "path": "rlaif/1.jpg"}}
    pair = read_preference_row(json.loads(_split_inline_images(row)[0]))
    assert pair.images == ["rlaif/1.jpg"] and pair.prompt[0].text == "<image>\nWho is there?"


def test_multi_turn_prompt_is_a_conversation():
    prompt = [{"from": "human", "value": "<image>\nHow many cubes?"}, {"from": "gpt", "value": "Two."},
              {"role": "system", "content": "Be brief."}, {"role": "user", "content": "And their colour?"}]
    pair = read_preference_row(hub_row(prompt=prompt, chosen="Red.", rejected="Gold."))
    assert [(t.role, t.text) for t in pair.prompt] == [
        (USER, "<image>\nHow many cubes?"), (ASSISTANT, "Two."), (USER, "And their colour?")]
    rendered = pair.conversation(pair.rejected)
    assert [t.text for t in rendered][-1] == "Gold." and rendered[0] is not pair.prompt[0]


def test_ultrafeedback_score_names():
    pair = read_preference_row(llava_next_row(chosen_score=None, rejected_score=None, score_chosen=8.5,
                                              score_rejected=3))
    assert (pair.chosen_score, pair.rejected_score) == (8.5, 3.0)


@pytest.mark.parametrize("changes,reason,detail", [
    ({"rejected": "A red cube."}, "identical_answers", "same text"),
    ({"rejected": "  A red cube.\n"}, "identical_answers", "same text"),
    ({"chosen": "   "}, "empty_answer", "chosen is empty"),
    ({"rejected": ""}, "empty_answer", "rejected is empty"),
    ({"prompt": None}, "missing_field", "no prompt"),
    ({"chosen": None}, "missing_field", "no `chosen` answer"),
    ({"prompt": 42}, "malformed_prompt", "prompt is int"),
    ({"prompt": []}, "malformed_prompt", "empty list"),
    ({"prompt": ["hello"]}, "malformed_prompt", "a message is str"),
    ({"prompt": [{"role": "user", "content": [{"type": "audio"}]}]}, "malformed_prompt", "a content part"),
    ({"rejected": {"text": "no"}}, "malformed_answer", "rejected is dict"),
    ({"chosen": [{"role": "user", "content": "Hi"}]}, "malformed_answer", "not the assistant's"),
    ({"chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "malformed_answer", "2 messages"),
    ({"chosen_score": "high"}, "malformed_score", "chosen score is 'high'"),
    ({"rejected_score": float("nan")}, "malformed_score", "rejected score"),
    ({"chosen_score": True}, "malformed_score", "chosen score is True"),
    ({"prompt": "<image> and <image>?"}, "image_tag_mismatch", "2 <image> tags for 1 images"),
    ({"chosen": "See <image> here."}, "image_tag_mismatch", "in an assistant turn"),
    ({"video": "clips/v1.mp4"}, "video_with_images", "not both"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     "roles_out_of_order", "expected user"),
    ({"prompt": [{"role": "narrator", "content": "Once"}]}, "malformed_conversation", "unknown role"),
])
def test_rejections(changes, reason, detail):
    error = rejection(llava_next_row(**changes))
    assert error.reason == reason and detail in error.detail, str(error)


def test_missing_rejected_field():
    row = llava_next_row()
    del row["rejected"]
    assert rejection(row).reason == "missing_field"


def test_image_part_in_a_hub_answer_is_rejected():
    answer = [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "This."}]}]
    assert rejection(hub_row(chosen=answer)).reason == "image_tag_mismatch"
