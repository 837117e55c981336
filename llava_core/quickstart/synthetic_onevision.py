"""The LLaVA-OneVision quickstart's synthetic dataset: high-resolution scenes whose small mark only tiles can read.

Each image is a canvas of 96 x 96 (or 96 x 64 / 64 x 96) px: exactly a grid of 3 x 3 (or 2 x 3 / 3 x 2) tiles of
the tiny tower's 32 px, so "Higher AnyRes" crops every tile unscaled; the quickstart's `anyres_max_4` then shrinks
the 3 x 3 feature map bilinearly to 4 tiles' worth, as OneVision does past its budget. (A first design drew 192 px
canvases, 6 x 6 tiles shrunk to 3 x 3's worth, when the tower said the dot on its patch only: the trained model read
the dot at chance. Now the tower says it on all its tile, `_dot_labels`, which survives the shrinking.) It holds the
large shapes of `synthetic.py` (drawn with its helpers, scaled up; their colour, shape, count and position questions
are answerable at the tower's base size too) plus one **small mark**: a 1 px opaque dot whose colour is asked
("highres" questions). Squashed to the base view (32 px) the dot is a faint tint of its colour, and the scene also
holds 2-4 **decoys**: larger, translucent spots of random palette colours that look just as faint there. So the base
view cannot tell which faint spot is the dot; in the tiles the dot is full-strength and the decoys stay faint.
tests/unit/test_synthetic_onevision.py measures both.

Multi-image rows (`"image": [a, b]`, two `<image>` tags) ask which of two scenes shows a given shape; OneVision sees
each image of a multi-image row at base size only, and the question needs no more. The eval split stays one image
per question (the LLaVA eval layout), so multi-image questions are trained, not evaluated.

The on-disk layout is `synthetic.generate`'s: align.json, instruct.json (with the two deliberately broken rows),
eval/questions.jsonl + eval/answers.jsonl, images/.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from llava_core.quickstart import synthetic
from llava_core.quickstart.synthetic import COLOURS, Shape

TILE = 32  # the tiny SigLIP tower's image size: one view
# (width, height): squares twice as often, and both orientations of 2:3, so three tile grids get used.
CANVASES = ((96, 96), (96, 96), (96, 64), (64, 96))
MARK_SIDE = 1  # px (odd: synthetic.paint's squares): a third of a pixel in the base view, one pixel in a tile
DECOY_SIDES = (3, 5)  # odd sides, as synthetic.paint draws squares 2r + 1 wide
DECOY_OPACITY = (0.06, 0.16)  # faint at every resolution; at base size as strong as the dot's smeared tint
DECOYS = (2, 4)
CLEARANCE = 5  # px between a spot and any shape or other spot, so no two blend into one in the base view
HIGHRES_SHARE = 0.5  # of eval questions, and of instruct rows that ask about the dot
MULTI_IMAGE_SHARE = 0.15  # of instruct image rows
# Turns an instruct row asks about its large shapes (as LLaVA-665K's rows hold several an image): the image's
# 120-172 tokens dominate a step's cost, a turn adds ~15, so more turns teach more in the same time. (With 2-3 the
# LLM had too few answers in the 20-minute budget: two runs of the same workflow read colour at 0.73 and at chance.)
QUESTIONS_PER_ROW = (3, 5)
HIGHRES_QUESTION = "What colour is the small dot?"
GENERATOR_VERSION = 8  # part of the OneVision dataset's hash: bump it when a change here should regenerate data
# The position kind's label on a tile's shape patches: "somewhere in a tile". A tile does not know its place in the
# image; left unlabelled, the tower guessed it from the tile's own frame (measured: a probe read a confidently wrong
# place on 54% of tile shape patches), and the LLM, which sees a shape in ~9x more tile tokens than base-view ones,
# believed it (position 0.48 against 0.79 at base size alone).
IN_A_TILE = len(synthetic.POSITIONS) + 1
# The view kind's labels, on every patch of a view. A ViT's patch tokens tell a whole-image view from a close-up by
# their content's scale; said outright here, so the LLM can look for places in the base view's tokens only. Without
# it the LLM answered "right" or "bottom" to every position question (0.16-0.26; pad 0.47-0.65); with it, 0.53 and
# 0.24 in two runs (pad 0.50, 0.53): learnable, not learned every time, until the layout kinds below.
BASE_VIEW, TILE_VIEW = 1, 2
# The layout kinds, one per colour: where the scene's shape of that colour lies (0: none has it), said on every patch
# of the base view, as a trained ViT's patch tokens carry a summary of their whole view. A tile cannot know it
# (IN_A_TILE there). With places said only on a shape's own base-view patches, "Where is the red circle?" in a pair
# scene meant finding the 1-4 base-view patches that are red, circle and base view at once among ~80 image tokens,
# which the tiny LLM learned in one AnyRes run of three (position 0.53; 0.24 and 0.26 in the others: it read the
# axis, not the side), while at base size alone every token was a base-view one (0.50 in all three). With them,
# 0.63-0.74 in three runs (pad 0.58-0.74; the quickstart workflow's header).
LAYOUT_KINDS = len(COLOURS)
# Per-patch label kinds of the tower's pretraining: synthetic.PATCH_LABEL_CLASSES (position with IN_A_TILE) + the
# dot's colour on its patch + the dot's colour on its tile (`_dot_labels`) + the view kind + the layout kinds.
PATCH_LABEL_CLASSES = (*synthetic.PATCH_LABEL_CLASSES[:2], IN_A_TILE + 1, len(COLOURS) + 1, len(COLOURS) + 1,
                       TILE_VIEW + 1, *(IN_A_TILE + 1,) * LAYOUT_KINDS)
# Each kind's weight in the pretraining loss: the layout kinds count as one kind together. At full weight each they
# crowded the dot's tile kind out of the tower (benchmarks/onevision_tower_probe.py read it at 0.007, against 0.87
# at a quarter each; the layout at 0.99 either way).
PATCH_LABEL_WEIGHTS = (1.0,) * (len(PATCH_LABEL_CLASSES) - LAYOUT_KINDS) + (1 / LAYOUT_KINDS,) * LAYOUT_KINDS
UNLABELLED = -100  # cross_entropy's ignore_index: what a view cannot show (the dot at base size)


@dataclass(frozen=True)
class Spot:
    colour: str
    x: int  # top-left corner on the canvas
    y: int
    side: int
    opacity: float = 1.0

    @property
    def centre(self) -> tuple[int, int]:
        return self.x + self.side // 2, self.y + self.side // 2


@dataclass(frozen=True)
class Scene:
    shapes: list[Shape]
    mark: Spot
    decoys: list[Spot]
    size: tuple[int, int]  # (width, height)


def draw_highres_scene(rng: random.Random) -> tuple[Scene, Image.Image, Image.Image]:
    """A random scene, its image, and the shapes' mask (as `synthetic.draw_scene_with_mask`'s)."""
    size = rng.choice(CANVASES)
    shapes = synthetic.random_scene(rng)
    # Radii scale with the short side: 8-12 px on 64, 12-18 px on 96 (4-6 px in the 32 px base view).
    image, mask = synthetic.draw_scene_with_mask(shapes, rng, size, scale=min(size) / 80)
    taken = np.asarray(mask) > 0
    mark = _place(Spot(rng.choice(list(COLOURS)), 0, 0, MARK_SIDE), taken, rng)
    decoys = []
    for _ in range(rng.randint(*DECOYS)):
        decoy = Spot(rng.choice(list(COLOURS)), 0, 0, rng.choice(DECOY_SIDES), round(rng.uniform(*DECOY_OPACITY), 2))
        decoys.append(_place(decoy, taken, rng))
    _paint_spots(image, [mark, *decoys])
    return Scene(shapes, mark, decoys, size), image, mask


def _place(spot: Spot, taken: np.ndarray, rng: random.Random) -> Spot:
    """`spot` moved to a random free place (`taken` marks shapes and earlier spots; updated), CLEARANCE px clear."""
    height, width = taken.shape
    for _ in range(1000):
        x, y = rng.randrange(2, width - spot.side - 2), rng.randrange(2, height - spot.side - 2)
        window = taken[max(0, y - CLEARANCE):y + spot.side + CLEARANCE, max(0, x - CLEARANCE):x + spot.side + CLEARANCE]
        if not window.any():
            taken[y:y + spot.side, x:x + spot.side] = True
            return Spot(spot.colour, x, y, spot.side, spot.opacity)
    raise RuntimeError("no free place for a spot: the canvas is too crowded")  # never seen with these sizes


def _paint_spots(image: Image.Image, spots: list[Spot]) -> None:
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for s in spots:
        synthetic.paint(draw, "square", *s.centre, s.side // 2, (*COLOURS[s.colour], round(255 * s.opacity)))
    image.paste(Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB"))


# --- what the vision tower sees: OneVision's views of a scene, labelled per patch (its pretraining data) --------


def tower_views(scene: Scene, image: Image.Image, mask: Image.Image, tile: int, patch: int, rng: random.Random,
                tiles: int = 3) -> list[tuple[Image.Image, np.ndarray]]:
    """(view, per-patch labels) pairs as OneVision cuts this scene for a `tile` px tower: the base view (the canvas
    squashed to tile size, as the processor resizes it) and `tiles` of its grid-aligned tiles (the canvases are
    exact tile grids, so the processor crops them unscaled), the dot's tile always among them: it is in one tile of
    up to 9, and the tower has to learn it. Labels are (patches, 6 + LAYOUT_KINDS): colour, shape, position, the
    dot's patch, the dot's tile, the view, the layout; 0 where a kind is absent, UNLABELLED where a view cannot
    show it (the base view cannot tell the dot from a decoy). In a tile, shapes are IN_A_TILE for position and the
    layout is IN_A_TILE; its dot labels are `_dot_labels`'."""
    width, height = scene.size
    if width % tile or height % tile:
        raise ValueError(f"canvas {scene.size} is not a grid of {tile} px tiles")
    grid = tile // patch
    base = synthetic.patch_labels(scene.shapes, mask.resize((tile, tile), Image.NEAREST), grid)
    views = [(image.resize((tile, tile), Image.BICUBIC),
              _with_kinds_of_the_view(base, UNLABELLED, BASE_VIEW, _layout(scene)))]
    cx, cy = scene.mark.centre
    dot_tile = (cy // tile, cx // tile)
    others = [(r, c) for r in range(height // tile) for c in range(width // tile) if (r, c) != dot_tile]
    for r, c in [dot_tile, *rng.sample(others, tiles - 1)]:
        box = (c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)
        labels = synthetic.patch_labels(scene.shapes, mask.crop(box), grid)
        labels[:, 2] = np.where(labels[:, 2] > 0, IN_A_TILE, 0)
        dot = _dot_labels(scene, box, patch, grid, rng)
        views.append((image.crop(box), _with_kinds_of_the_view(labels, dot, TILE_VIEW, IN_A_TILE)))
    return views


def _dot_labels(scene: Scene, box: tuple, patch: int, grid: int, rng: random.Random) -> np.ndarray:
    """The two dot kinds' labels of one tile, (patches, 2):
    - the dot's patch: its colour on the dot's patch, "no dot" (0) on the decoys' patches and on one random patch,
      UNLABELLED elsewhere (labelling every other patch 0 let the tower score 15/16 by never seeing a dot);
    - the dot's tile: its colour on every patch of the tile that holds it, 0 on every patch of the others, as a
      trained ViT's patch tokens carry what their neighbourhood holds. With the first kind alone the tower found the
      dot (a probe read its colour at 0.96) but the tiny LLM had to fetch 1 token of ~170 and learned to in one run
      of four; the second puts it in 16. The tower learns the second only on top of the first, and only with a layer
      to spread it in before the one LLaVA reads (measured with benchmarks/onevision_tower_probe.py: 2 layers read it
      at chance, 3 layers at 0.9)."""
    colour = list(COLOURS).index(scene.mark.colour) + 1

    def index(spot: Spot) -> int | None:
        x, y = spot.centre
        inside = box[0] <= x < box[2] and box[1] <= y < box[3]
        return (y - box[1]) // patch * grid + (x - box[0]) // patch if inside else None

    own_patch = np.full(grid * grid, UNLABELLED, dtype=np.int64)
    own_patch[rng.randrange(grid * grid)] = 0
    for decoy in scene.decoys:
        if (i := index(decoy)) is not None:
            own_patch[i] = 0
    holds_the_dot = (i := index(scene.mark)) is not None
    if holds_the_dot:
        own_patch[i] = colour
    tile = np.full(grid * grid, colour if holds_the_dot else 0, dtype=np.int64)
    return np.stack([own_patch, tile], axis=1)


def _layout(scene: Scene) -> np.ndarray:
    """The layout kinds' labels of the whole scene, (LAYOUT_KINDS,): each colour's shape's place, 0 if none."""
    layout = np.zeros(LAYOUT_KINDS, dtype=np.int64)
    for shape in scene.shapes:
        layout[list(COLOURS).index(shape.colour)] = synthetic.POSITIONS.index(shape.position) + 1
    return layout


def _with_kinds_of_the_view(labels: np.ndarray, dot, view: int, layout) -> np.ndarray:
    """`labels` (patches, 3) with the two dot kinds appended (`dot`: their (patches, 2) labels or one value), then
    the view kind and the layout kinds (`layout`: their (LAYOUT_KINDS,) labels or one value), on every patch."""
    patches = labels.shape[0]
    return np.concatenate([labels, np.broadcast_to(dot, (patches, 2)), np.full((patches, 1), view),
                           np.broadcast_to(layout, (patches, LAYOUT_KINDS))], axis=1)


# --- questions and rows ------------------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    return f"{synthetic.caption(scene.shapes)}, and a small {scene.mark.colour} dot"


def highres_question(scene: Scene) -> tuple[str, str, str]:
    return "highres", HIGHRES_QUESTION, scene.mark.colour


def instruct_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """QUESTIONS_PER_ROW (category, question, answer) triples about the large shapes (fewer if the scene answers
    fewer), plus the dot's colour at a random turn in HIGHRES_SHARE of the rows."""
    qa = synthetic.questions(scene.shapes, rng)[: rng.randint(*QUESTIONS_PER_ROW)]
    if rng.random() < HIGHRES_SHARE:
        qa.insert(rng.randrange(len(qa) + 1), highres_question(scene))
    return qa


def which_image_question(with_it: Scene, without_it: Scene, rng: random.Random) -> tuple[str | None, bool]:
    """"Which image shows a <colour> <kind>?" about a shape of `with_it` that `without_it` lacks (None if it
    has them all), and whether `with_it` goes first."""
    theirs = {(s.colour, s.kind) for s in without_it.shapes}
    candidates = [s for s in with_it.shapes if (s.colour, s.kind) not in theirs]
    if not candidates:
        return None, False
    target = rng.choice(candidates)
    return f"Which image shows a {target.colour} {target.kind}, the first or the second?", rng.random() < 0.5


def multi_image_row(idx: int, names: tuple[str, str], question: str, first: bool) -> dict:
    # OneVision's multi-image data writes one <image> per image, in order, before the text.
    return {"id": f"multi-{idx:06d}", "image": list(names), "conversations": [
        {"from": "human", "value": "<image>\n<image>\n" + question},
        {"from": "gpt", "value": "first" if first else "second"}]}


def eval_question(i: int, scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """Every other question asks for the dot (exactly HIGHRES_SHARE = 0.5); the rest as synthetic.generate's."""
    return highres_question(scene) if i % 2 == 0 else synthetic.questions(scene.shapes, rng)[0]


# --- the dataset -------------------------------------------------------------------------------------------------


def generate_onevision(root: str, align_rows: int, instruct_rows: int, eval_questions: int, text_only_rows: int,
                       seed: int, description_rows: int = 0, description_noise: float = 0.0,
                       preference_pairs: int = 0, preference_eval_pairs: int = 0, describe_questions: int = 0) -> dict:
    """Write the dataset under `root` in `synthetic.generate`'s layout; returns the same paths. `instruct_rows`
    counts image rows, MULTI_IMAGE_SHARE of them with two images. The preference stage's data is only made from the
    coloured shapes (`synthetic.generate`): its settings must be 0 here."""
    asked = {"description_rows": description_rows, "description_noise": description_noise,
             "preference_pairs": preference_pairs, "preference_eval_pairs": preference_eval_pairs,
             "describe_questions": describe_questions}
    if any(asked.values()):
        raise ValueError(f"the LLaVA-OneVision synthetic dataset has no description or preference data; set "
                         f"{', '.join(f'synthetic.{k}' for k, v in asked.items() if v)} to 0 (the coloured-shapes "
                         f"dataset of the other families has them)")
    rng = random.Random(seed)
    images_dir = synthetic.dataset_paths(root)["image_folder"]
    os.makedirs(images_dir, exist_ok=True)

    def new_image(name: str) -> tuple[str, Scene]:
        scene, image, _ = draw_highres_scene(rng)
        image.save(os.path.join(images_dir, name))
        return name, scene

    align = []
    for i in range(align_rows):
        name, scene = new_image(f"align_{i:06d}.png")
        align.append(synthetic.caption_row(i, name, caption(scene), rng))
    instruct = [_instruct_image_row(i, new_image, rng) for i in range(instruct_rows)]
    instruct += [synthetic.text_only_row(i, rng) for i in range(text_only_rows)]
    instruct += synthetic.broken_rows(images_dir, rng)
    rng.shuffle(instruct)

    eval_q, eval_a = [], []
    for i in range(eval_questions):
        name, scene = new_image(f"eval_{i:06d}.png")
        category, q, a = eval_question(i, scene, rng)
        eval_q.append({"question_id": i, "image": name, "text": q, "category": category})
        eval_a.append({"question_id": i, "answer": a})
    return synthetic.write_dataset(root, align, instruct, eval_q, eval_a)


def _instruct_image_row(i: int, new_image, rng: random.Random) -> dict:
    if rng.random() >= MULTI_IMAGE_SHARE:
        name, scene = new_image(f"instruct_{i:06d}.png")
        return synthetic.qa_row(i, name, instruct_questions(scene, rng), rng)
    name_a, scene_a = new_image(f"instruct_{i:06d}_a.png")
    question = None
    while question is None:  # redraw the second scene until it lacks one of the first's shapes (nearly always)
        name_b, scene_b = new_image(f"instruct_{i:06d}_b.png")
        question, a_first = which_image_question(scene_a, scene_b, rng)
    return multi_image_row(i, (name_a, name_b) if a_first else (name_b, name_a), question, a_first)
