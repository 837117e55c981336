"""The `<image>` tokens transformers' processor expands an image into are exactly the features the model makes of it,
for LLaVA-NeXT (anyres: tiling + unpadding + row newlines) and LLaVA-OneVision (anyres_max_9: also the bilinear
shrink past ~9 tiles), at the real towers' tile geometry (CLIP 336 px / 14 = 24 x 24, SigLIP 384 px / 14 = 27 x 27;
the towers themselves are tiny). A mismatch is reported as (height, width): processor count, model count.

Two levels: 40 real images through the processor, the tower and `get_image_features` (and a few full forward
passes, which check the count themselves); and thousands of sizes through the processor's size-only count
(`_get_num_multimodal_tokens`, what vLLM and a prepare step can use without decoding pixels) against the model's
own `pack_image_features` on placeholder features, over several pinpoint grids."""
import math
import os
import random

import pytest
import torch
from PIL import Image

from llava_core.model import build
from llava_core.quickstart import standins

TOWERS = {"llava_next": "openai/clip-vit-large-patch14-336", "llava_onevision": "google/siglip-so400m-patch14-384"}
LLMS = {"llava_next": "lmsys/vicuna-7b-v1.5", "llava_onevision": "Qwen/Qwen2-7B-Instruct"}
TILES = {"llava_next": (336, 14), "llava_onevision": (384, 14)}

# (height, width): 1 px to 2304 px; square, wide, tall; just under / on / over tile multiples; the two sizes
# where LLaVA-NeXT's original unpadding (int truncation) and transformers' (int(round(x, 7))) disagree.
IMAGE_SIZES = [(1, 1), (3, 2), (17, 17), (40, 30), (335, 336), (336, 336), (337, 385), (480, 640), (640, 480),
               (792, 1408), (820, 1107), (899, 1024), (1024, 899), (720, 1280), (1344, 672), (2, 2000), (2000, 3),
               (100, 2304), (2304, 100), (2304, 2304)]
EDGES = [1, 2, 7, 13, 14, 27, 100, 223, 335, 336, 337, 383, 384, 385, 500, 671, 672, 673, 767, 768, 769, 792, 820,
         1007, 1008, 1009, 1107, 1151, 1152, 1408, 1535, 1536, 1920, 2303, 2304, 2305, 3000, 4032, 6000, 10000]
SWEEP_SIZES = [(h, w) for h in EDGES for w in EDGES] + \
    [(random.Random(n).randint(1, 8000), random.Random(-n - 1).randint(1, 8000)) for n in range(400)]


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hub"))
    corpus = ["a red circle on the left", "What colour is the shape?", "blue"] * 10
    models = {}
    for name in ("llava_next", "llava_onevision"):
        tile, patch = TILES[name]
        cfg = standins.TinyModelConfig(image_size=tile, patch_size=patch, vision_hidden=32, vision_layers=2,
                                       llm_hidden=64, llm_layers=1, llm_heads=4, vocab_size=400)
        paths = [os.path.join(root, name, hub_id) for hub_id in (TOWERS[name], LLMS[name])]
        for hub_id, path in zip((TOWERS[name], LLMS[name]), paths):
            standins.save_standin(hub_id, path, corpus, cfg)
        torch.manual_seed(0)
        model, processor = build.assemble(name, *paths)
        models[name] = (model.eval(), processor)
    return models


def prompt(processor) -> str:
    turn = [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]
    return processor.apply_chat_template([{"role": "user", "content": turn}], add_generation_prompt=True)


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_processor_tokens_equal_the_features_the_model_makes(assembled, name):
    model, processor = assembled[name]
    mismatches = []
    for height, width in IMAGE_SIZES:
        image = Image.new("RGB", (width, height), (200, 40, 40))
        inputs = processor(images=image, text=prompt(processor), return_tensors="pt")
        tokens = int((inputs.input_ids == model.config.image_token_id).sum())
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=inputs.pixel_values,
                                                      image_sizes=inputs.image_sizes).pooler_output
        by_size = processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]
        if not tokens == features[0].shape[0] == by_size:
            mismatches.append(((height, width), tokens, features[0].shape[0], by_size))
    assert not mismatches, f"(size, processor tokens, model features, size-only count): {mismatches}"


@pytest.mark.parametrize("name, size", [("llava_next", (792, 1408)), ("llava_onevision", (2304, 2304)),
                                        ("llava_onevision", (2, 2000))])
def test_a_forward_pass_accepts_the_expanded_prompt(assembled, name, size):
    model, processor = assembled[name]
    inputs = processor(images=Image.new("RGB", size[::-1]), text=prompt(processor), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits  # raises "Image features and image tokens do not match" otherwise
    assert logits.shape[1] == inputs.input_ids.shape[1]


def onevision_budget_grid(pinpoints_tile: int) -> list[list[int]]:
    return [[r * pinpoints_tile, c * pinpoints_tile] for r in range(1, 4) for c in range(1, 4)]


@pytest.mark.parametrize("name, grids", [("llava_next", None), ("llava_onevision", None),
                                         ("llava_next", "3x3"), ("llava_onevision", "3x3")])
def test_size_only_counts_equal_the_models_packing_over_thousands_of_sizes(assembled, monkeypatch, name, grids):
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, processor = assembled[name]
    tile, patch = TILES[name]
    if grids == "3x3":  # another pinpoint list: both sides must read it the same way
        pinpoints = onevision_budget_grid(tile)
        monkeypatch.setattr(model.config, "image_grid_pinpoints", pinpoints)
        monkeypatch.setattr(processor.image_processor, "image_grid_pinpoints", pinpoints)
    pinpoints = model.config.image_grid_pinpoints
    per_view, newline = (tile // patch) ** 2, torch.zeros(1)
    mismatches, grids_used = [], set()
    for height, width in SWEEP_SIZES:
        views = image_size_to_num_patches((height, width), pinpoints, tile)
        placeholder = [torch.zeros(views, per_view, 1)]
        sizes = torch.tensor([[height, width]])
        if name == "llava_onevision":
            packed, _ = model.model.pack_image_features(placeholder, sizes, image_newline=newline,
                                                        vision_aspect_ratio=model.config.vision_aspect_ratio)
        else:
            packed, _ = model.model.pack_image_features(placeholder, sizes, "full", image_newline=newline)
        expected = processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]
        if packed[0].shape[0] != expected:
            mismatches.append(((height, width), expected, packed[0].shape[0]))
        grids_used.add(tuple(select_best_resolution([height, width], pinpoints)))
    assert not mismatches, f"(size, processor count, model features): {mismatches[:20]} of {len(mismatches)}"
    assert grids_used == {tuple(p) for p in pinpoints}  # every grid of the list was exercised


def test_onevision_caps_a_single_image_near_its_paper_budget(assembled):
    """(1 + 9 tiles) x 729 = 7,290 features in the paper; with unpadding and row newlines the most any size gets is
    a little above, because the shrink only starts past 1.1x the 9-tile budget."""
    _, processor = assembled["llava_onevision"]
    counts = processor._get_num_multimodal_tokens(image_sizes=SWEEP_SIZES)["num_image_tokens"]
    most = max(counts)
    assert 7290 < most < 729 + math.ceil(1.1 ** 2 * 9 * 729) + 2304 // 14
    assert min(counts) > 729  # the base view alone is 729
