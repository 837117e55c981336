"""The instruct data the serve stage takes its demo question from, shared by tests/unit/test_serve_stage.py and
tests/integration/test_serve_stage.py (the fixture reaches them through tests/conftest.py's pytest_plugins)."""
from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

QUESTION = "What colour is the shape in the middle?"


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def instruct_data(tmp_path_factory):
    """A JSON array: a text-only row, then a row with a JPEG image, then enough rows to need several reads."""
    root = tmp_path_factory.mktemp("instruct")
    os.makedirs(root / "images")
    image = encoded(Image.new("RGB", (40, 24), (30, 90, 200)), "JPEG")
    (root / "images" / "blue.jpg").write_bytes(image)
    text_only = {"id": "t0", "conversations": [{"from": "human", "value": "Say hello."},
                                               {"from": "gpt", "value": "Hello."}]}
    with_image = {"id": "i1", "image": "blue.jpg", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "Blue."}]}
    rows = [text_only, with_image] + [dict(text_only, id=f"t{i}") for i in range(2, 4000)]
    path = root / "instruct.json"
    path.write_text(json.dumps(rows))
    return {"path": str(path), "image_folder": str(root / "images"), "image": image}
