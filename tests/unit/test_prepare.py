"""Prepare's pieces without Ray: its padding is LLaVA-1.5's, and too many rejects stop the stage (the stage on Ray
Data: tests/integration/test_prepare.py)."""
import io

import numpy as np
import pytest
from PIL import Image

from llava_core.data import pipeline
from tests.prepare_helpers import expand2square


def test_padding_is_the_official_expand2square_in_the_exports_processor(tiny_dataset):
    """Prepare's crops are LLaVA-1.5's: `expand2square` with the background `tuple(int(x * 255) for x in
    image_mean)` (122, 116, 104 for CLIP, truncated, not rounded), then the tower's CLIP processor. The processor the
    export saves (`LlavaImageProcessor`, `do_pad`) computes the same pixels on its own."""
    from transformers import AutoImageProcessor

    from llava_core.data.rows import RowPreparer

    preparer = RowPreparer(tiny_dataset["vision"], tiny_dataset["llm"],
                           {"template": "vicuna_v1", "image_folder": "", "max_length": 512})
    tall = Image.new("RGB", (32, 64), (255, 255, 255))  # padded left and right to 64x64
    buffer = io.BytesIO()
    tall.save(buffer, format="PNG")
    images = preparer.images  # the crop format (llava_core/data/image_layouts.py)
    record = images.prepare([buffer.getvalue()]).columns["pixel_values"]
    crop = np.frombuffer(record["uint8"], dtype=np.uint8).reshape(3, 64, 64)
    scale, offset = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (record["scale"], record["offset"]))
    pixels = crop * scale + offset
    tower = AutoImageProcessor.from_pretrained(tiny_dataset["vision"])
    background = tuple(int(x * 255) for x in tower.image_mean)
    assert background == (122, 116, 104)
    official = tower(images=[expand2square(tall, background)], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(pixels, official, atol=1e-5)  # lossless: uint8 crop + affine = the float path
    assert type(images.image_processor).__name__.startswith("LlavaImageProcessor") and images.image_processor.do_pad
    export_side = images.image_processor(images=[tall], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(export_side, official, atol=1e-5)
    expected_pad = (np.array(background) / 255 - np.array(tower.image_mean)) / np.array(tower.image_std)
    np.testing.assert_allclose(pixels[:, 32, 0], expected_pad, atol=1e-5)  # left band: the truncated mean colour
    assert pixels[:, 32, 32].min() > 1.0  # white centre stays white


def test_reject_threshold_stops_the_stage():
    manifest = {"datasets": {"mix": {"rows_in": 100, "rows_rejected": 5, "rejected_by_reason": {"image_missing": 5},
                                     "source": "x.json"}}}
    pipeline.check_reject_fraction(manifest, 0.05)
    with pytest.raises(pipeline.TooManyRejects, match="5 of 100 rows rejected"):
        pipeline.check_reject_fraction(manifest, 0.01)
