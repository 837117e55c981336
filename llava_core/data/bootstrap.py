"""Create the quickstart's synthetic dataset and tiny base models, again whenever their settings change."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from PIL import Image

from llava_core.config import settings_hash
from llava_core.data import synthetic
from llava_core.data.images import mean_colour, pad_to_square
from llava_core.model import standins


def ensure_synthetic(workflow) -> None:
    s = workflow.synthetic
    marker = os.path.join(s.root, ".complete")
    wanted = settings_hash(s, workflow.model, synthetic.GENERATOR_VERSION, standins.VERSION)
    if os.path.exists(marker) and json.load(open(marker)).get("hash") == wanted:
        return
    print(f"creating the synthetic dataset and tiny base models in {s.root}", flush=True)
    paths = synthetic.generate(s.root, s.align_rows, s.instruct_rows, s.eval_questions, s.text_only_rows, s.seed)
    rows = json.load(open(paths["align"])) + json.load(open(paths["instruct"]))
    corpus = [turn["value"] for row in rows for turn in row["conversations"]]
    model_cfg = standins.TinyModelConfig(**s.tiny_model.__dict__, seed=s.seed)
    # A generator: the scenes are only drawn if the tower is pretrained (tower_pretraining_steps > 0).
    pretraining = (labelled_scene_batches(standins.tiny_image_processor(model_cfg), model_cfg),
                   synthetic.PATCH_LABEL_CLASSES)
    standins.save_tiny_models(workflow.model.vision_tower, workflow.model.llm, corpus, model_cfg, pretraining)
    with open(marker, "w") as f:
        json.dump({"hash": wanted}, f)


def labelled_scene_batches(processor, cfg: standins.TinyModelConfig, batch_size: int = 64, pool: int = 4096):
    """Endless shuffled batches of fresh scenes (never the dataset's images), padded and processed exactly as
    preparation does, with per-patch labels of what each patch shows (the vision tower's pretraining data)."""
    rng = random.Random(f"tower-{cfg.seed}")
    fill, grid = mean_colour(processor), cfg.image_size // cfg.patch_size
    images, labels = [], []
    for _ in range(pool):
        scene = synthetic.random_scene(rng)
        image, mask = synthetic.draw_scene_with_mask(scene, rng)
        images.append(pad_to_square(image, fill))
        square_mask = pad_to_square(mask, 0).resize((cfg.image_size, cfg.image_size), Image.NEAREST)
        labels.append(synthetic.patch_labels(scene, square_mask, grid))
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    labels = torch.from_numpy(np.stack(labels))
    generator = torch.Generator().manual_seed(cfg.seed)
    while True:
        for batch in torch.randperm(pool, generator=generator).split(batch_size):
            yield pixels[batch], labels[batch]
