"""What the OneVision quickstart's pretrained tiny SigLIP tower tells the LLM, read with linear probes (~15 s).

The quickstart's dot questions need the LLM to find one patch among a scene's 144 tile features and read its colour.
When a run reads the dot at chance, this says whether the tower or the LLM is at fault. On fresh scenes (never the
dataset's), cut into every tile as the processor crops them:

- dot: a linear probe of the tile features for the colour of the dot their tile holds (0: none; the tower is
  pretrained to say it on every patch of the dot's tile, `synthetic_onevision._dot_labels`): accuracy on the
  patches of the dot's tiles, on the dot's own patch, on the patches of the other tiles (should say "no dot"), and
  how often the tile's most common answer is right for the dot's tiles;
- layout: a probe of the base views' features for each colour's place in the scene (the tower is pretrained to say
  it on every base-view patch, `synthetic_onevision.LAYOUT_KINDS`): accuracy over the colours a scene holds, on
  every patch (chance about 0.25; pair scenes need the side, not only the axis);
- tile_position: a probe trained on the base views' position labels, applied to the tiles' shape patches: how often
  it reads a confident (> 0.8) place there. A tile cannot know its place; what the tower says there, the LLM reads.

Last line: {"tower", "scenes", "dot": {...}, "layout": {...}, "tile_position": {...}}.

    PYTHONPATH=. python benchmarks/onevision_tower_probe.py data/quickstart-onevision/models/vision [--scenes 800]
    PYTHONPATH=. python benchmarks/onevision_tower_probe.py --smoke

--smoke (benchmarks/harness.py): 40 scenes, 50 probe steps, and without a tower argument an untrained tower of the
quickstart's shape: checks the script in seconds; its accuracies mean nothing.
"""
from __future__ import annotations

import argparse
import random

import harness
import numpy as np
import torch

from llava_core.quickstart import standins, synthetic, synthetic_onevision as ov

TILE, PATCH = 32, 8  # the quickstart's tower: 32 px views, 8 px patches (4 x 4 features a view)
GRID = TILE // PATCH
BACKGROUND, SHAPE, DECOY, DOT = range(4)


def tile_views(scene, image, mask):
    """Every tile of the scene with per-patch (the colour of the dot the tile holds or 0, what lies there, position
    label)."""
    width, height = scene.size
    dot_colour = list(synthetic.COLOURS).index(scene.mark.colour) + 1
    for r in range(height // TILE):
        for c in range(width // TILE):
            box = (c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE)
            labels = synthetic.patch_labels(scene.shapes, mask.crop(box), GRID)
            kind = np.where(labels[:, 0] > 0, SHAPE, BACKGROUND)
            holds_the_dot = False
            for spot, what in [*((d, DECOY) for d in scene.decoys), (scene.mark, DOT)]:
                x, y = spot.centre
                if box[0] <= x < box[2] and box[1] <= y < box[3]:
                    kind[(y - box[1]) // PATCH * GRID + (x - box[0]) // PATCH] = what
                    holds_the_dot |= what == DOT
            dot = np.full(GRID * GRID, dot_colour if holds_the_dot else 0, dtype=np.int64)
            yield image.crop(box), dot, kind, labels[:, 2]


def features(tower, processor, views) -> torch.Tensor:
    pixels = processor(images=views, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        # OneVision reads the last layer of the cut tower: hidden state -2 of the full one.
        return torch.cat([tower(pixel_values=pixels[i:i + 256], output_hidden_states=True).hidden_states[-2]
                          for i in range(0, len(pixels), 256)]).flatten(0, 1)


PROBE_STEPS = [1500]  # Adam steps per probe; --probe-steps sets it


def fit_probe(x, y, classes: int, weight=None) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(PROBE_STEPS[0]):
        batch = torch.randint(0, len(x), (4096,))
        loss = torch.nn.functional.cross_entropy(head(x[batch]), y[batch], weight=weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def dot_probe(x, dot, kind) -> dict:
    split = int(0.8 * len(x)) // (GRID * GRID) * GRID * GRID  # whole tiles on each side
    head = fit_probe(x[:split], dot[:split], len(synthetic.COLOURS) + 1)
    with torch.no_grad():
        predicted = head(x[split:]).argmax(-1)
    truth, what = dot[split:], kind[split:]
    in_dot_tile = truth > 0
    per_tile, truth_per_tile = predicted.view(-1, GRID * GRID), truth.view(-1, GRID * GRID)[:, 0]
    dot_tiles = truth_per_tile > 0
    votes = per_tile[dot_tiles].mode(1).values
    return {"dot_tile_patches_colour": round((predicted == truth)[in_dot_tile].float().mean().item(), 3),
            "dot_patch_colour": round((predicted == truth)[what == DOT].float().mean().item(), 3),
            "other_tiles_no_dot": round((predicted == 0)[~in_dot_tile].float().mean().item(), 3),
            "dot_tile_vote_colour": round((votes == truth_per_tile[dot_tiles]).float().mean().item(), 3)}


def base_views(tower, processor, scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """The scenes' base views as the tower sees them: features and labels, (scenes x patches, ...) each."""
    bases = [ov.tower_views(scene, image, mask, TILE, PATCH, random.Random(0), tiles=1)[0]
             for scene, image, mask in scenes]
    labels = torch.from_numpy(np.stack([view_labels for _, view_labels in bases])).flatten(0, 1)
    return features(tower, processor, [view for view, _ in bases]), labels


def layout_probe(x, labels, scenes) -> dict:
    layout = labels[:, -ov.LAYOUT_KINDS:]  # (patches, colours)
    pairs = torch.tensor([len(scene.shapes) == 2 for scene, _, _ in scenes]).repeat_interleave(GRID * GRID)
    split = int(0.8 * len(x)) // (GRID * GRID) * GRID * GRID
    hits = []
    for colour in range(layout.shape[1]):
        head = fit_probe(x[:split], layout[:split, colour], ov.IN_A_TILE + 1)
        with torch.no_grad():
            predicted = head(x[split:]).argmax(-1)
        present = layout[split:, colour] > 0
        hits.append(((predicted == layout[split:, colour]) & present, present))
    right, present = (torch.stack(h).sum(0) for h in zip(*hits))
    held_out_pairs = pairs[split:]
    return {"base_view_accuracy": round((right.sum() / present.sum()).item(), 3),
            "pair_scenes_accuracy": round((right[held_out_pairs].sum() / present[held_out_pairs].sum()).item(), 3)}


def tile_position_probe(tower, processor, scenes, x, labels) -> dict:
    y = labels[:, 2]  # the position kind
    head = fit_probe(x, y, len(synthetic.POSITIONS) + 1)
    tiles = [(view, position) for s in scenes for view, _, _, position in tile_views(*s)]
    with torch.no_grad():
        p = head(features(tower, processor, [v for v, _ in tiles])).softmax(-1)
    truth = torch.from_numpy(np.stack([position for _, position in tiles])).flatten()
    on_shapes = truth > 0
    confident = p[on_shapes].max(-1).values > 0.8
    return {"base_view_accuracy": round((head(x).argmax(-1)[y > 0] == y[y > 0]).float().mean().item(), 3),
            "tile_shape_patches": int(on_shapes.sum()),
            "confident_place_on_tiles": round(confident.float().mean().item(), 3),
            "confident_and_wrong_on_tiles": round((confident & (p[on_shapes].argmax(-1) != truth[on_shapes]))
                                                  .float().mean().item(), 3)}


def untrained_tower():
    """A SigLIP tower of the quickstart's view and patch sizes with random weights (for --smoke)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(image_size=TILE, patch_size=PATCH, hidden_size=32,
                                                intermediate_size=64, num_hidden_layers=2, num_attention_heads=2))


def main() -> None:
    from transformers import SiglipVisionModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tower", nargs="?",
                        help="the saved tiny SigLIP tower (data/quickstart-onevision/models/vision); only --smoke "
                        "may leave it out")
    parser.add_argument("--scenes", type=int, default=800)
    parser.add_argument("--probe-steps", type=int, default=PROBE_STEPS[0])
    args = harness.parse_args(parser, smoke={"scenes": 40, "probe_steps": 50})
    if args.tower is None and not args.smoke:
        parser.error("the tower is required (only --smoke builds an untrained one)")
    PROBE_STEPS[0] = args.probe_steps
    tower = (SiglipVisionModel.from_pretrained(args.tower) if args.tower else untrained_tower()).eval()
    processor = standins.tiny_siglip_image_processor(standins.TinyModelConfig(image_size=TILE, patch_size=PATCH))
    rng = random.Random(123)
    scenes = [ov.draw_highres_scene(rng) for _ in range(args.scenes)]
    tiles = [t for s in scenes for t in tile_views(*s)]
    x = features(tower, processor, [view for view, *_ in tiles])
    dot = torch.from_numpy(np.stack([d for _, d, _, _ in tiles])).flatten()
    kind = torch.from_numpy(np.stack([k for _, _, k, _ in tiles])).flatten()
    half = scenes[: args.scenes // 2]
    base_x, base_labels = base_views(tower, processor, half)
    harness.print_summary({"tower": args.tower or "untrained", "scenes": args.scenes, "dot": dot_probe(x, dot, kind),
                           "layout": layout_probe(base_x, base_labels, half),
                           "tile_position": tile_position_probe(tower, processor, half, base_x, base_labels)})


if __name__ == "__main__":
    main()
