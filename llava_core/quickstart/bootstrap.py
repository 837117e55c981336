"""Create a quickstart's synthetic dataset and tiny base models, again whenever their settings change."""
from __future__ import annotations

import dataclasses
import json
import os
import random

import numpy as np
import torch
from PIL import Image

from llava_core.config import settings_hash
from llava_core.data.images import mean_colour, pad_to_square
from llava_core.model import families
from llava_core.quickstart import standins, synthetic, synthetic_onevision


def ensure_synthetic(workflow) -> None:
    """The dataset and base models of `workflow.synthetic`, for `workflow.model.family`: LLaVA-OneVision gets
    high-resolution scenes and SigLIP + Qwen2 stand-ins, every other family the coloured shapes with CLIP + Vicuna."""
    s = workflow.synthetic
    onevision = workflow.model.family == "llava_onevision"
    generator = synthetic_onevision if onevision else synthetic
    marker = os.path.join(s.root, ".complete")
    wanted = settings_hash(s, workflow.model, generator.GENERATOR_VERSION, standins.VERSION)
    if os.path.exists(marker) and json.load(open(marker)).get("hash") == wanted:
        return
    print(f"creating the synthetic dataset and tiny base models in {s.root}", flush=True)
    write = synthetic_onevision.generate_onevision if onevision else synthetic.generate
    paths = write(s.root, s.align_rows, s.instruct_rows, s.eval_questions, s.text_only_rows, s.seed,
                  description_rows=s.description_rows, description_noise=s.description_noise,
                  preference_pairs=s.preference_pairs, preference_eval_pairs=s.preference_eval_pairs,
                  describe_questions=s.describe_questions)
    rows = json.load(open(paths["align"])) + json.load(open(paths["instruct"]))
    corpus = [turn["value"] for row in rows for turn in row["conversations"]] + preference_texts(paths["preference"])
    model_cfg = standins.TinyModelConfig(**dataclasses.asdict(s.tiny_model), seed=s.seed)
    # Generators: the scenes are only drawn if the tower is pretrained (tower_pretraining_steps > 0).
    if onevision:
        base_models = families.family("llava_onevision")
        pretraining = (labelled_view_batches(standins.tiny_siglip_image_processor(model_cfg), model_cfg),
                       synthetic_onevision.PATCH_LABEL_CLASSES, synthetic_onevision.PATCH_LABEL_WEIGHTS)
        standins.save_tiny_models(workflow.model.vision_tower, workflow.model.llm, corpus, model_cfg, pretraining,
                                  base_models.vision_tower, base_models.llm)
    else:
        pretraining = (labelled_scene_batches(standins.tiny_image_processor(model_cfg), model_cfg),
                       synthetic.PATCH_LABEL_CLASSES, None)
        standins.save_tiny_models(workflow.model.vision_tower, workflow.model.llm, corpus, model_cfg, pretraining)
    with open(marker, "w") as f:
        json.dump({"hash": wanted}, f)


def preference_texts(path: str) -> list[str]:
    """The training pairs' prompts and answers, for the tokenizer's corpus: its words are then whole tokens, as the
    instruct rows' are. None without pairs, so the tokenizer of a dataset without them is what it was."""
    if not os.path.exists(path):
        return []
    return [text for row in json.load(open(path)) for text in (row["prompt"], row["chosen"], row["rejected"])]


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
    yield from _shuffled_batches(processor, images, labels, cfg.seed, batch_size)


def labelled_view_batches(processor, cfg: standins.TinyModelConfig, batch_size: int = 64, pool: int = 4096):
    """`labelled_scene_batches` for LLaVA-OneVision's tower: fresh high-resolution scenes, each as the views the
    model gets of it (the base view and tiles: `synthetic_onevision.tower_views`), `pool` scenes' worth."""
    rng = random.Random(f"onevision-tower-{cfg.seed}")
    images, labels = [], []
    for _ in range(pool):
        scene, image, mask = synthetic_onevision.draw_highres_scene(rng)
        for view, view_labels in synthetic_onevision.tower_views(scene, image, mask, cfg.image_size, cfg.patch_size,
                                                                 rng):
            images.append(view)
            labels.append(view_labels)
    yield from _shuffled_batches(processor, images, labels, cfg.seed, batch_size)


def _shuffled_batches(processor, images: list, labels: list, seed: int, batch_size: int):
    """Endless reshuffled batches of (pixel values, labels) of the processed `images`."""
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    labels = torch.from_numpy(np.stack(labels))
    generator = torch.Generator().manual_seed(seed)
    while True:
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            yield pixels[batch], labels[batch]
