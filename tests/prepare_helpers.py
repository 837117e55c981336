"""A dirty dataset (good rows of each kind, one row of every bad kind) and the prepare stage run on it, shared by
tests/integration/test_prepare.py and tests/end_to_end/test_prepare.py (the fixture reaches them through
tests/conftest.py's pytest_plugins); LLaVA-1.5's own padding, shared with tests/unit/test_prepare.py."""
import io
import json
import os

import pytest
from PIL import Image

from llava_core.config import SourceSettings
from llava_core.data import pipeline
from llava_core.data.rows import RowSettings

SETTINGS = {"max_length": 260, "too_long": "reject", "image_aspect_ratio": "pad", "max_image_pixels": 1_000_000}
ROW_SETTINGS = RowSettings(template="vicuna_v1", num_actors=2, rows_per_shard=100, **SETTINGS)


def turns(question="<image>\nWhat colour is the shape?", answer="red"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def save(folder, name, data: bytes):
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def png(size=(40, 30), colour=(200, 20, 20), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dirty_dataset(tmp_path_factory):
    """One JSON array in the official layout: good rows of each kind plus one row of every bad kind."""
    folder = str(tmp_path_factory.mktemp("dirty"))
    images = os.path.join(folder, "images")
    os.makedirs(images)
    save(images, "good.png", png())
    save(images, "second.png", png(colour=(20, 20, 200)))
    save(images, "gif_named.jpg", png(fmt="GIF"))  # a GIF saved as .jpg: decodes, so it is kept
    save(images, "truncated.png", png()[:60])
    save(images, "text.png", b"this is not an image at all")
    save(images, "empty.png", b"")
    save(images, "bomb.png", png(size=(1200, 1000)))  # 1.2 MP > the 1 MP limit of this test
    good = [
        {"id": "image-row", "image": "good.png", "conversations": turns()},
        {"id": "tag-after-text", "image": "good.png", "conversations": turns("What colour?\n<image>")},
        {"id": "text-only", "conversations": turns("What is one plus one?", "two")},
        {"id": "multi-image", "image": ["good.png", "second.png"],
         "conversations": turns("<image>\n<image>\nWhich colours?", "red and blue")},
        {"id": "gif-as-jpg", "image": "gif_named.jpg", "conversations": turns()},
        {"id": "role-content", "image": "good.png",
         "conversations": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]},
    ]
    bad = {
        "image_missing": {"image": "nope.png", "conversations": turns()},
        "image_corrupt": {"image": "truncated.png", "conversations": turns()},
        "not_an_image": {"image": "text.png", "conversations": turns()},
        "image_empty": {"image": "empty.png", "conversations": turns()},
        "image_too_large": {"image": "bomb.png", "conversations": turns()},
        "empty_conversation": {"image": "good.png", "conversations": []},
        "malformed_conversation": {"image": "good.png", "conversations": [{"from": "human", "value": 3},
                                                                          {"from": "gpt", "value": "x"}]},
        "roles_out_of_order": {"image": "good.png", "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a"}]},
        "image_tag_mismatch": {"image": ["good.png", "second.png"], "conversations": turns()},
        "too_long": {"image": "good.png", "conversations": turns("<image>\n" + "very long question " * 60)},
    }
    good.append({"id": "model-empty", "model": "", "conversations": turns("Say hi.", "hi")})  # as in mix665k
    rows = good + [{"id": f"bad-{reason}", **row} for reason, row in bad.items()]
    rows.append(7)  # not a row object at all: rejected as malformed_row (it has no id)
    bad["malformed_row"] = None
    path = os.path.join(folder, "data.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return {"path": path, "image_folder": images, "good": [r["id"] for r in good], "bad": bad}


def prepare(dataset, tiny_dataset, out_dir, path=None, image_folder=None):
    source = SourceSettings(path or dataset["path"], image_folder or dataset["image_folder"])
    return pipeline.prepare_dataset("mix", [source], tiny_dataset["vision"], tiny_dataset["llm"], ROW_SETTINGS,
                                    str(out_dir))


def expected_rejects(dataset):
    return {(f"bad-{k}" if k != "malformed_row" else ""): k for k in dataset["bad"]}


def expand2square(pil_img, background_color):
    """LLaVA-1.5's own padding (llava/mm_utils.py), the reference prepare and the export's processor must match."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result
