"""Hostile rows and the image folder they point into, shared by tests/unit/test_hostile_rows.py and
tests/integration/test_hostile_rows.py (its fixture reaches them through tests/conftest.py's pytest_plugins)."""
from __future__ import annotations

import codecs
import io
import os

import pytest
from PIL import Image

BOM = codecs.BOM_UTF8


def image_row(row_id: str, image) -> dict:
    return {"id": row_id, "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                            {"from": "gpt", "value": "red"}]}


def png(colour=(200, 20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.fixture()
def image_tree(tmp_path):
    """images/{red.png, sub/, inside -> red.png, escape -> ../secret.png} and secret.png beside the folder."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "red.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png((0, 0, 0)))
    os.symlink(folder / "red.png", folder / "inside.png")
    os.symlink(tmp_path / "secret.png", folder / "escape.png")
    os.symlink(tmp_path, folder / "parent")
    return folder
