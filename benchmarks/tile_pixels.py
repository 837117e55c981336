"""What the tile shard format costs the trainer: decoding one stored JPEG and running the family's image processor
(AnyRes tiling, resize, normalise) in the prefetch thread, per image, at the real towers' tile sizes (CLIP 336 px
for LLaVA-NeXT, SigLIP 384 px for OneVision; the towers themselves are tiny stand-ins, which the timing never runs).

Last line: {family: {"ms_per_image", "views", "jpeg_bytes", "repeats"}}.

    PYTHONPATH=. python benchmarks/tile_pixels.py [--repeats 10] [--smoke]

--smoke: 2 repeats (benchmarks/harness.py); the tile sizes stay the real ones, a few seconds.
"""
import argparse
import io
import os
import tempfile
import time

import harness
import numpy as np
from PIL import Image

from llava_core.data.image_layouts import TilePixels
from llava_core.model import families, processors
from llava_core.quickstart import standins

BASES = {"llava_onevision": ("google/siglip-so400m-patch14-384", "Qwen/Qwen2-7B-Instruct", 384),
         "llava_next": ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5", 336)}
CORPUS = ["What colour is the shape?", "a red circle on the left", "blue"] * 20


def photo_jpeg(height: int = 480, width: int = 640) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def measure(name: str, root: str, repeats: int) -> dict:
    tower, llm, side = BASES[name]
    cfg = standins.TinyModelConfig(image_size=side, patch_size=14, vision_hidden=32, vision_layers=1, llm_hidden=32,
                                   llm_layers=1, llm_heads=2, vocab_size=400)
    vision_path, llm_path = os.path.join(root, name, "vision"), os.path.join(root, name, "llm")
    standins.save_standin(tower, vision_path, CORPUS, cfg)
    standins.save_standin(llm, llm_path, CORPUS, cfg)
    fam = families.family(name)
    processor = processors.base_processor(fam, vision_path, llm_path, fam.template, fam.image_layout)
    pixels, data = TilePixels(processor, name), photo_jpeg()
    pixels([[data]])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        batch = pixels([[data]])
    return {"ms_per_image": round((time.perf_counter() - start) / repeats * 1000, 1), "views": pixels.views(batch),
            "jpeg_bytes": len(data), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = harness.parse_args(parser, smoke={"repeats": 2})
    with tempfile.TemporaryDirectory() as root:
        harness.print_summary({name: measure(name, root, args.repeats) for name in BASES})


if __name__ == "__main__":
    main()
