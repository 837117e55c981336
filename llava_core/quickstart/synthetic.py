"""A synthetic LLaVA dataset of coloured shapes, written in the official on-disk layout.

Images are PNGs in an image folder; annotations are JSON arrays of `{"id", "image", "conversations"}` rows, as in
`blip_laion_cc_sbu_558k.json` (align) and `llava_v1_5_mix665k.json` (instruct). A held-out evaluation split is written
as LLaVA eval files: `questions.jsonl` (`question_id`, `image`, `text`, `category`) and `answers.jsonl`.
The task can only be solved by looking: colour, shape, count and position are uniformly random.

For the preference stage, optionally: instruct rows asking for a description, some of them naming a shape the image
does not show (noisy captions, which teach hallucination); DPO pairs in LLaVA-NeXT's layout (`train_dpo.py`:
`{"id", "image", "prompt", "chosen", "rejected"}`) on training and on held-out images; and held-out description
questions in the `chair` eval layout (`eval/describe.jsonl`), which count the hallucinations.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNT_WORDS = {1: "one", 2: "two"}
WIDTH, HEIGHT = 96, 72  # not square on purpose: the "pad" aspect-ratio mode has something to do

CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short caption for the image.",
)
DESCRIBE_PROMPTS = (
    "Describe the image in detail.",  # the preference pairs' and the describe questions' prompt
    "Give a detailed description of the image.",
    "What does this image show? Describe it in detail.",
)
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
GENERATOR_VERSION = 5  # part of the dataset's hash: bump it when a change here should regenerate existing data
TEXT_ONLY_QA = (
    ("Name a primary colour.", "red"),
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("Is a circle round?", "yes"),
    ("What is one plus one?", "two"),
)


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    position: str

    def phrase(self) -> str:
        return f"a {self.colour} {self.kind} on the {self.position}"


def random_scene(rng: random.Random) -> list[Shape]:
    if rng.random() < 0.6:
        return lone_scene(rng)
    kinds = rng.sample(SHAPES, 2)
    colours = rng.sample(list(COLOURS), 2)
    first, second = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
    return [Shape(colours[0], kinds[0], first), Shape(colours[1], kinds[1], second)]


def lone_scene(rng: random.Random) -> list[Shape]:
    return [Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS))]


def _centre(position: str, rng: random.Random, size: tuple[int, int], scale: float) -> tuple[int, int]:
    spread = round(4 * scale)
    jitter = lambda: rng.randint(-spread, spread)  # noqa: E731
    width, height = size
    cx, cy = width // 2, height // 2
    offsets = {"left": (-width // 4, 0), "right": (width // 4, 0), "top": (0, -height // 4), "bottom": (0, height // 4)}
    dx, dy = offsets[position]
    return cx + dx + jitter(), cy + dy + jitter()


def draw_scene(scene: list[Shape], rng: random.Random) -> Image.Image:
    return draw_scene_with_mask(scene, rng)[0]


def draw_scene_with_mask(scene: list[Shape], rng: random.Random, size: tuple[int, int] = (WIDTH, HEIGHT),
                         scale: float = 1.0) -> tuple[Image.Image, Image.Image]:
    """The image and a same-size mask whose pixel value is 1 + the index in `scene` of the shape drawn there.
    `size` is (width, height); `scale` multiplies the shapes' radius and jitter, for larger canvases (at the
    defaults the random draws, hence the quickstart's images, are exactly those of the fixed 96 x 72 canvas)."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", size, background)
    mask = Image.new("L", size, 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for index, shape in enumerate(scene):
        cx, cy = _centre(shape.position, rng, size, scale)
        r = rng.randint(round(10 * scale), round(15 * scale))
        paint(draw_image, shape.kind, cx, cy, r, COLOURS[shape.colour])
        paint(draw_mask, shape.kind, cx, cy, r, index + 1)
    return image, mask


def paint(draw: ImageDraw.ImageDraw, kind: str, cx: int, cy: int, r: int, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def patch_labels(scene: list[Shape], mask: Image.Image, grid: int) -> np.ndarray:
    """(grid * grid, 3) class ids per patch of a square mask: colour, shape and position of the shape that covers
    at least a quarter of the patch; 0 where none does (background)."""
    side = mask.size[0]
    cell = side // grid
    owners = np.asarray(mask).reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    labels = np.zeros((grid * grid, 3), dtype=np.int64)
    for index, shape in enumerate(scene):
        covered = (owners == index + 1).mean(axis=1) >= 0.25
        labels[covered] = (
            list(COLOURS).index(shape.colour) + 1,
            SHAPES.index(shape.kind) + 1,
            POSITIONS.index(shape.position) + 1,
        )
    return labels


PATCH_LABEL_CLASSES = (len(COLOURS) + 1, len(SHAPES) + 1, len(POSITIONS) + 1)


def caption(scene: list[Shape]) -> str:
    return " and ".join(shape.phrase() for shape in scene)


def object_phrases(scene: list[Shape]) -> list[str]:
    """The scene's objects as a `chair` eval set lists them: "colour kind", e.g. "red circle"."""
    return [f"{shape.colour} {shape.kind}" for shape in scene]


# --- descriptions that name what is not there (the preference stage's data) ---------------------------------------
# Every unfaithful caption is the caption of a scene that could have been drawn: distinct colours and kinds, shapes on
# opposite sides, listed left before right and top before bottom. So its form alone (how many shapes, their order,
# its length) never gives it away to a model that does not look: a lone shape plus an invented one reads exactly as a
# faithful two-shape caption, and a substitution keeps the faithful caption's length and form.


def invented_shape(scene: list[Shape], rng: random.Random) -> Shape:
    """A shape the scene does not show, as a drawn scene's other shape would be: a colour and a kind no shape of the
    scene has, opposite a lone shape, or on the free axis beside a pair."""
    colour = rng.choice([c for c in COLOURS if c not in {shape.colour for shape in scene}])
    kind = rng.choice([k for k in SHAPES if k not in {shape.kind for shape in scene}])
    return Shape(colour, kind, added_position(scene, rng.choice))


def added_position(scene: list[Shape], choose) -> str:
    """Where a shape added to the scene goes, as a drawn scene's other shape would be: opposite a lone shape, or
    `choose`n among the free axis's two places beside a pair."""
    if len(scene) == 1:
        return OPPOSITE[scene[0].position]
    return choose([p for p in POSITIONS if p not in {shape.position for shape in scene}])


def with_invented_shape(scene: list[Shape], rng: random.Random) -> list[Shape]:
    """The scene plus an invented shape, in caption order (left, right, top, bottom)."""
    return in_caption_order(scene + [invented_shape(scene, rng)])


def companion(scene: list[Shape]) -> Shape:
    """The shape noisy captions habitually add to a scene: a co-occurrence habit, as COCO's captions name a dining
    table beside chairs (the objects CHAIR found models hallucinate). It follows from the caption's first shape alone
    (the next colour and kind, in their lists' order, that no shape of the scene has), so it is a language prior a
    model learns from the text, and the real shapes' words stay faithful: the instruct model's perception is not
    taught noise, only the habit of adding the companion."""
    colour = next_absent(list(COLOURS), scene[0].colour, {shape.colour for shape in scene})
    kind = next_absent(list(SHAPES), scene[0].kind, {shape.kind for shape in scene})
    return Shape(colour, kind, added_position(scene, lambda free: free[0]))


def next_absent(options: list[str], after: str, present: set[str]) -> str:
    """The first of `options` after `after`, going round, that is not in `present`."""
    at = options.index(after)
    return next(option for option in options[at + 1:] + options[:at] if option not in present)


def in_caption_order(scene: list[Shape]) -> list[Shape]:
    return sorted(scene, key=lambda shape: POSITIONS.index(shape.position))


def substituted(scene: list[Shape], rng: random.Random) -> list[Shape]:
    """The scene with one shape's colour or kind swapped for one no shape of the scene has: same length and form as
    the faithful caption, and an object ("colour kind") the image does not show."""
    index = rng.randrange(len(scene))
    shape = scene[index]
    if rng.random() < 0.5:
        shape = replace(shape, colour=rng.choice([c for c in COLOURS if c not in {s.colour for s in scene}]))
    else:
        shape = replace(shape, kind=rng.choice([k for k in SHAPES if k not in {s.kind for s in scene}]))
    return scene[:index] + [shape] + scene[index + 1:]


def questions(scene: list[Shape], rng: random.Random) -> list[tuple[str, str, str]]:
    """(category, question, answer) triples that this scene answers unambiguously."""
    qa = [("count", "How many shapes are there?", COUNT_WORDS[len(scene)])]
    if len(scene) == 1:
        s = scene[0]
        qa += [
            ("colour", "What colour is the shape?", s.colour),
            ("shape", "What shape is it?", s.kind),
            ("position", "Where is the shape?", s.position),
        ]
    else:
        for s in scene:
            qa += [
                ("colour", f"What colour is the {s.kind}?", s.colour),
                ("shape", f"What shape is on the {s.position}?", s.kind),
                ("position", f"Where is the {s.colour} {s.kind}?", s.position),
            ]
    rng.shuffle(qa)
    return qa


def image_turn(text: str, rng: random.Random) -> str:
    # Real data puts <image> before or after the text; preparation normalises it to the front.
    return f"<image>\n{text}" if rng.random() < 0.8 else f"{text}\n<image>"


def align_row(idx: int, image: str, scene: list[Shape], rng: random.Random) -> dict:
    return caption_row(idx, image, caption(scene), rng)


def caption_row(idx: int, image: str, text: str, rng: random.Random) -> dict:
    """A stage-1 row: a random caption instruction with the image, answered by `text`."""
    return {
        "id": f"align-{idx:06d}",
        "image": image,
        "conversations": [
            {"from": "human", "value": image_turn(rng.choice(CAPTION_PROMPTS), rng)},
            {"from": "gpt", "value": text},
        ],
    }


def instruct_row(idx: int, image: str, scene: list[Shape], rng: random.Random) -> dict:
    return qa_row(idx, image, questions(scene, rng)[: rng.randint(2, 3)], rng)


def qa_row(idx: int, image: str, qa: list[tuple[str, str, str]], rng: random.Random) -> dict:
    """A multi-turn instruct row asking the (category, question, answer) triples `qa` in order."""
    turns = []
    for i, (_, q, a) in enumerate(qa):
        turns.append({"from": "human", "value": image_turn(q, rng) if i == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return {"id": f"instruct-{idx:06d}", "image": image, "conversations": turns}


def description_row(idx: int, image: str, scene: list[Shape], noisy: bool, rng: random.Random) -> dict:
    """An instruct row asking for a description, answered with the caption, or (`noisy`) with the scene's `companion`
    added, a shape the image does not show, as noisy human or GPT captions do: SFT on them teaches a model to
    hallucinate."""
    described = in_caption_order(scene + [companion(scene)]) if noisy else scene
    return {
        "id": f"describe-{idx:06d}",
        "image": image,
        "conversations": [
            {"from": "human", "value": image_turn(rng.choice(DESCRIBE_PROMPTS), rng)},
            {"from": "gpt", "value": caption(described)},
        ],
    }


def preference_row(row_id: str, image: str, scene: list[Shape], addition: bool, rng: random.Random) -> dict:
    """A DPO pair in LLaVA-NeXT's layout (llava/train/train_dpo.py): the faithful caption chosen, rejected one that
    adds an invented shape (`addition`) or swaps one shape's colour or kind."""
    unfaithful = with_invented_shape(scene, rng) if addition else substituted(scene, rng)
    return {"id": row_id, "image": image, "prompt": f"<image>\n{DESCRIBE_PROMPTS[0]}", "chosen": caption(scene),
            "rejected": caption(unfaithful)}


def text_only_row(idx: int, rng: random.Random) -> dict:
    q, a = rng.choice(TEXT_ONLY_QA)
    return {"id": f"text-{idx:06d}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def generate(root: str, align_rows: int, instruct_rows: int, eval_questions: int, text_only_rows: int,
             seed: int, description_rows: int = 0, description_noise: float = 0.0, preference_pairs: int = 0,
             preference_eval_pairs: int = 0, describe_questions: int = 0) -> dict:
    """Write the dataset under `root`; returns the paths. Two deliberately broken rows go into the instruct set
    (a missing image and a corrupt file) because real data has them and preparation must reject them visibly.
    The preference stage's data (`description_rows` and the rest, see `preference_data`) is drawn after the rest from
    a random stream of its own: with those counts at 0, every file is what it was without them."""
    rng = random.Random(seed)
    images_dir = dataset_paths(root)["image_folder"]
    os.makedirs(images_dir, exist_ok=True)

    def new_image(name: str) -> tuple[str, list[Shape]]:
        return drawn(images_dir, name, random_scene(rng), rng)

    align = [align_row(i, *new_image(f"align_{i:06d}.png"), rng) for i in range(align_rows)]
    instruct = [instruct_row(i, *new_image(f"instruct_{i:06d}.png"), rng) for i in range(instruct_rows)]
    instruct += [text_only_row(i, rng) for i in range(text_only_rows)]
    instruct += broken_rows(images_dir, rng)
    rng.shuffle(instruct)

    eval_q, eval_a = [], []
    for i in range(eval_questions):
        name, scene = new_image(f"eval_{i:06d}.png")
        category, q, a = questions(scene, rng)[0]
        eval_q.append({"question_id": i, "image": name, "text": q, "category": category})
        eval_a.append({"question_id": i, "answer": a})

    own = random.Random(f"preference-{seed}")
    instruct = with_descriptions(instruct, description_rows, description_noise, images_dir, own)
    paths = write_dataset(root, align, instruct, eval_q, eval_a)
    preference_data(paths, preference_pairs, preference_eval_pairs, describe_questions, own)
    return paths


def drawn(images_dir: str, name: str, scene: list[Shape], rng: random.Random) -> tuple[str, list[Shape]]:
    """Draw the scene into `images_dir`/`name`."""
    draw_scene(scene, rng).save(os.path.join(images_dir, name))
    return name, scene


def with_descriptions(instruct: list[dict], count: int, noise: float, images_dir: str,
                      rng: random.Random) -> list[dict]:
    """The instruct rows with `count` description rows on images of their own, each at a random place (the rows are
    shuffled already); exactly round(noise * count) of them name an invented shape, so the share is the setting's."""
    noisy = set(rng.sample(range(count), round(noise * count)))
    rows = list(instruct)
    for i in range(count):
        name, scene = drawn(images_dir, f"describe_{i:06d}.png", random_scene(rng), rng)
        rows.insert(rng.randrange(len(rows) + 1), description_row(i, name, scene, i in noisy, rng))
    return rows


def preference_rows(prefix: str, count: int, images_dir: str, rng: random.Random) -> list[dict]:
    """`count` DPO pairs on new images named `prefix`_N.png, every other one rejecting an addition. An addition pair
    shows a lone shape: added to a pair, the invented shape would make a three-shape caption, which no faithful one is
    (the form would give it away)."""
    rows = []
    for i in range(count):
        addition = i % 2 == 1
        scene = lone_scene(rng) if addition else random_scene(rng)
        name, _ = drawn(images_dir, f"{prefix}_{i:06d}.png", scene, rng)
        rows.append(preference_row(f"{prefix}-{i:06d}", name, scene, addition, rng))
    return rows


def describe_rows(count: int, images_dir: str, rng: random.Random) -> list[dict]:
    """`chair`-layout questions on new held-out images: a description asked, each image's objects listed."""
    rows = []
    for i in range(count):
        name, scene = drawn(images_dir, f"eval_describe_{i:06d}.png", random_scene(rng), rng)
        rows.append({"question_id": i, "image": name, "text": DESCRIBE_PROMPTS[0], "objects": object_phrases(scene),
                     "category": f"{COUNT_WORDS[len(scene)]} {'shape' if len(scene) == 1 else 'shapes'}"})
    return rows


def preference_data(paths: dict, pairs: int, eval_pairs: int, describe: int, rng: random.Random) -> None:
    """The DPO pairs (`preference`), the held-out ones (`preference_eval`) and the `chair` set (`describe`), each on
    images of its own."""
    folder = paths["image_folder"]
    write_if_any(paths["preference"], preference_rows("preference", pairs, folder, rng), write_json)
    write_if_any(paths["preference_eval"], preference_rows("eval_preference", eval_pairs, folder, rng), write_json)
    write_if_any(paths["describe"], describe_rows(describe, folder, rng), write_jsonl)


def write_if_any(path: str, rows: list[dict], write) -> None:
    """No rows, no file: one left by an earlier run is removed, so that a workflow naming it fails instead of reading
    stale data."""
    if rows:
        write(path, rows)
    elif os.path.exists(path):
        os.remove(path)


def dataset_paths(root: str) -> dict:
    """Where a synthetic dataset's files are under `root` (both generators write this layout); `validate` accepts
    these as missing, since the first run creates them."""
    return {
        "align": os.path.join(root, "align.json"),
        "instruct": os.path.join(root, "instruct.json"),
        "eval_questions": os.path.join(root, "eval", "questions.jsonl"),
        "eval_answers": os.path.join(root, "eval", "answers.jsonl"),
        "image_folder": os.path.join(root, "images"),
        "preference": os.path.join(root, "preference.json"),
        "preference_eval": os.path.join(root, "eval", "preference.json"),
        "describe": os.path.join(root, "eval", "describe.jsonl"),
    }


def write_dataset(root: str, align: list[dict], instruct: list[dict], eval_q: list[dict], eval_a: list[dict]) -> dict:
    """The annotation files of a dataset whose images are already in `root`/images; returns their paths."""
    paths = dataset_paths(root)
    write_json(paths["align"], align)
    write_json(paths["instruct"], instruct)
    write_jsonl(paths["eval_questions"], eval_q)
    write_jsonl(paths["eval_answers"], eval_a)
    return paths


def broken_rows(images_dir: str, rng: random.Random) -> list[dict]:
    with open(os.path.join(images_dir, "corrupt_000000.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(64)))
    turns = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]
    return [
        {"id": "broken-missing-image", "image": "does_not_exist.png", "conversations": turns},
        {"id": "broken-corrupt-image", "image": "corrupt_000000.png", "conversations": turns},
    ]


def write_json(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
