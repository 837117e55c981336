"""Test clips made with PyAV, the OneVision stand-ins at a 32 px tile (4 x 4 patches: 2 x 2 pooled = 4 tokens a
frame) and a video request's body, shared by tests/unit/test_video_rows.py and tests/integration/test_video_rows.py
(the fixtures reach them through tests/conftest.py's pytest_plugins)."""
import base64
import io
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from llava_core.config import ServeSettings
from llava_core.data.rows import RowPreparer
from llava_core.model import build, families
from llava_core.quickstart import standins
from llava_core.serve import protocol
from llava_core.serve.media import decode_media

HUB = {"llava_onevision": ("google/siglip-so400m-patch14-384", "Qwen/Qwen2-7B-Instruct"),
       "llava_next": ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5")}
FRAMES = 8  # prepare.video_frames in these tests
TILE = 32


def colour(i: int) -> tuple[int, int, int]:
    return (i * 12) % 256, 255 - (i * 12) % 256, 40


def mp4_bytes(frames: int = 20, width: int = 64, height: int = 48, fps: int = 10, gop: int | None = None) -> bytes:
    """A clip whose frame i is one flat colour, `colour(i)`."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(frames):
            pixels = np.empty((height, width, 3), np.uint8)
            pixels[...] = colour(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def png(size, rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size[::-1], rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def video_base_models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("video_hub"))
    corpus = ["What happens in the video?", "red", "green", "It fades from red to green."] * 10
    cfg = standins.TinyModelConfig(image_size=TILE, patch_size=8, vision_hidden=32, vision_layers=2, llm_hidden=64,
                                   llm_layers=1, llm_heads=4, vocab_size=400)
    paths = {}
    for name, (tower, llm) in HUB.items():
        paths[name] = (os.path.join(root, name, "vision"), os.path.join(root, name, "llm"))
        standins.save_standin(tower, paths[name][0], corpus, cfg)
        standins.save_standin(llm, paths[name][1], corpus, cfg)
    return paths


def preparer_for(video_base_models, name="llava_onevision", **settings) -> RowPreparer:
    vision, llm = video_base_models[name]
    template = "chat_template" if name == "llava_onevision" else "vicuna_v1"
    return RowPreparer(vision, llm, {"template": template, "max_length": 4096, "family": name,
                                     "image_aspect_ratio": families.family(name).image_layout,
                                     "video_frames": FRAMES, **settings})


@pytest.fixture(scope="module")
def video_onevision(video_base_models):
    vision, llm = video_base_models["llava_onevision"]
    torch.manual_seed(0)
    model, processor = build.assemble("llava_onevision", vision, llm)
    return model.eval(), processor, preparer_for(video_base_models)


def video_body(url: str, model: str = "m") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens in the video?"}]}]}


def data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def checked(body: dict, settings: ServeSettings, takes_videos: bool = True):
    """The replica's checks before it counts tokens: the body, then its images and videos, decoded."""
    chat = protocol.parse_chat_request(body, settings, "m", takes_videos=takes_videos)
    return chat, *decode_media(chat, settings)


@pytest.fixture(scope="module")
def video_export(video_onevision, tmp_path_factory) -> str:
    model, processor, _ = video_onevision
    path = str(tmp_path_factory.mktemp("onevision_export"))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
