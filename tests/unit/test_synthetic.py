"""The synthetic scenes' masks and per-patch labels (the tiny vision tower's pretraining on them:
tests/end_to_end/test_synthetic.py), and the preference stage's data: descriptions, DPO pairs, the `chair` set."""
import dataclasses
import json
import os
import random
import re

import numpy as np
import pytest
from PIL import Image

from llava_core.config import EvalSetSettings
from llava_core.eval.layouts import EvalItem, load_eval_set
from llava_core.eval.scoring import chair_vocabulary, mentions, score_set
from llava_core.quickstart import synthetic


def test_the_mask_marks_exactly_the_pixels_of_each_shape():
    scene = [synthetic.Shape("red", "circle", "left"), synthetic.Shape("blue", "triangle", "right")]
    image, mask = synthetic.draw_scene_with_mask(scene, random.Random(3))
    pixels, owners = np.asarray(image), np.asarray(mask)
    for index, shape in enumerate(scene):
        drawn = np.all(pixels == synthetic.COLOURS[shape.colour], axis=-1)
        assert drawn.sum() > 100
        assert np.array_equal(drawn, owners == index + 1)
    left, right = (np.nonzero(owners == k)[1].mean() for k in (1, 2))
    assert left < synthetic.WIDTH / 2 < right


def test_patch_labels_name_the_shape_under_each_patch():
    scene = [synthetic.Shape("green", "square", "top"), synthetic.Shape("yellow", "circle", "bottom")]
    mask = Image.new("L", (16, 16), 0)
    mask.paste(1, (0, 0, 8, 8))       # shape 1 fills the top-left patch
    mask.paste(2, (8, 8, 16, 12))     # shape 2 covers half of the bottom-right patch
    mask.paste(2, (8, 0, 10, 2))      # and 1/16 of the top-right one: too little to count
    labels = synthetic.patch_labels(scene, mask, grid=2)
    green, yellow = (list(synthetic.COLOURS).index(c) + 1 for c in ("green", "yellow"))
    square, circle = (synthetic.SHAPES.index(k) + 1 for k in ("square", "circle"))
    top, bottom = (synthetic.POSITIONS.index(p) + 1 for p in ("top", "bottom"))
    assert labels.tolist() == [[green, square, top], [0, 0, 0], [0, 0, 0], [yellow, circle, bottom]]


# --- the preference stage's data -----------------------------------------------------------------------------------

VOCABULARY = chair_vocabulary([EvalItem("", "", "", [f"{c} {k}" for c in synthetic.COLOURS for k in synthetic.SHAPES])])
PREFERENCE = dict(description_rows=40, description_noise=0.25, preference_pairs=30, preference_eval_pairs=20,
                  describe_questions=24)


def small(root, **extra):
    return synthetic.generate(str(root), align_rows=6, instruct_rows=8, eval_questions=6, text_only_rows=2, seed=3,
                              **extra)


@pytest.fixture(scope="module")
def with_preference(tmp_path_factory):
    return small(tmp_path_factory.mktemp("preference"), **PREFERENCE)


def shapes_in(text: str) -> list[synthetic.Shape]:
    """The shapes a caption names, in order ("a red circle on the left and ...")."""
    return [synthetic.Shape(*m) for m in re.findall(r"\ba (\w+) (\w+) on the (\w+)\b", text)]


def colours_drawn(path: str) -> set[str]:
    """The shape colours an image shows (the background is near white: no shape colour)."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return {name for name, rgb in synthetic.COLOURS.items() if np.all(pixels == rgb, axis=-1).sum() > 50}


def assert_drawable(scene: list[synthetic.Shape]) -> None:
    """A caption of a scene `random_scene` could draw: one shape, or two of distinct colours and kinds on opposite
    sides, left before right and top before bottom."""
    if len(scene) == 2:
        assert [s.position for s in scene] in (["left", "right"], ["top", "bottom"])
        assert scene[0].colour != scene[1].colour and scene[0].kind != scene[1].kind
    else:
        assert len(scene) == 1


@pytest.mark.parametrize("seed", range(40))
def test_a_rejected_caption_names_what_is_not_there_in_a_faithful_captions_form(seed):
    rng = random.Random(seed)
    scene = synthetic.random_scene(rng)
    substitution = synthetic.preference_row("p", "p.png", scene, addition=False, rng=rng)
    lone = synthetic.lone_scene(rng)
    addition = synthetic.preference_row("q", "q.png", lone, addition=True, rng=rng)
    assert substitution["chosen"] == synthetic.caption(scene) and addition["chosen"] == synthetic.caption(lone)
    assert substitution["prompt"] == addition["prompt"] == "<image>\nDescribe the image in detail."
    swapped = shapes_in(substitution["rejected"])
    changed = [(a, b) for a, b in zip(scene, swapped) if a != b]
    assert len(swapped) == len(scene) and len(changed) == 1  # one shape, same length
    (before, after), = changed
    assert (before.colour != after.colour) + (before.kind != after.kind) == 1 and before.position == after.position
    assert f"{after.colour} {after.kind}" not in synthetic.object_phrases(scene)
    added = shapes_in(addition["rejected"])
    assert len(added) == 2 and lone[0] in added
    invented = next(s for s in added if s != lone[0])
    assert invented.position == synthetic.OPPOSITE[lone[0].position]
    for caption in (swapped, added):
        assert_drawable(caption)


def test_generated_pairs_describe_their_own_images(with_preference):
    root = os.path.dirname(with_preference["align"])
    for key, count in (("preference", 30), ("preference_eval", 20)):
        pairs = json.load(open(with_preference[key]))
        assert len(pairs) == count and len({p["id"] for p in pairs}) == count
        for i, pair in enumerate(pairs):
            chosen, rejected = (mentions(pair[k], VOCABULARY) for k in ("chosen", "rejected"))
            drawn = colours_drawn(os.path.join(root, "images", pair["image"]))
            assert {phrase.split()[0] for phrase in chosen} == drawn  # faithful: the image's colours
            assert set(rejected) - set(chosen)  # names an object the image does not show
            # Even pairs swap a colour or kind (same number of shapes), odd ones add a shape to a lone one.
            assert len(rejected) == (len(chosen) if i % 2 == 0 else 2)
            assert_drawable(shapes_in(pair["rejected"]))


def test_noisy_descriptions_are_the_settings_share(with_preference):
    root = os.path.dirname(with_preference["align"])
    rows = [r for r in json.load(open(with_preference["instruct"])) if r["id"].startswith("describe-")]
    assert len(rows) == 40
    assert {r["conversations"][0]["value"].replace("<image>", "").strip() for r in rows} == set(
        synthetic.DESCRIBE_PROMPTS)
    noisy = [r for r in rows if {p.split()[0] for p in mentions(r["conversations"][1]["value"], VOCABULARY)}
             != colours_drawn(os.path.join(root, "images", r["image"]))]
    assert len(noisy) == round(0.25 * 40)


def test_held_out_images_are_new_and_the_describe_set_scores_as_chair(with_preference):
    paths = with_preference
    images = {key: {r["image"] for r in json.load(open(paths[key])) if "image" in r}  # text-only rows have none
              for key in ("instruct", "align", "preference", "preference_eval")}
    describe = [json.loads(line) for line in open(paths["describe"])]
    images["describe"] = {r["image"] for r in describe}
    images["eval"] = {json.loads(line)["image"] for line in open(paths["eval_questions"])}
    for a in images:
        for b in images:
            assert a == b or not images[a] & images[b], (a, b)
    assert all(name.startswith("eval_") for key in ("preference_eval", "describe") for name in images[key])
    assert len(describe) == 24
    for row in describe:
        assert {o.split()[0] for o in row["objects"]} == colours_drawn(os.path.join(paths["image_folder"],
                                                                                    row["image"]))
    items = load_eval_set(EvalSetSettings(layout="chair", questions=paths["describe"],
                                          image_folder=paths["image_folder"]))
    faithful = [" and ".join(f"a {o}" for o in item.references) for item in items]
    score = score_set("chair", items, faithful)
    assert (score.metrics["accuracy"], score.metrics["chair_i"], score.metrics["recall"]) == (1.0, 0.0, 1.0)


def test_zero_counts_leave_the_dataset_as_it_was(tmp_path, with_preference):
    plain = small(tmp_path / "plain")
    made = os.path.dirname(with_preference["align"])
    for key in ("align", "eval_questions", "eval_answers"):
        assert open(plain[key], "rb").read() == open(with_preference[key], "rb").read()
    # The instruct rows are those of the plain dataset, in order, with the description rows put in between.
    instruct = [r for r in json.load(open(with_preference["instruct"])) if not r["id"].startswith("describe-")]
    assert instruct == json.load(open(plain["instruct"]))
    for name in os.listdir(plain["image_folder"]):
        assert open(os.path.join(plain["image_folder"], name), "rb").read() == open(
            os.path.join(made, "images", name), "rb").read()
    assert not any(os.path.exists(plain[k]) for k in ("preference", "preference_eval", "describe"))
    again = small(tmp_path / "plain", preference_pairs=2)
    assert len(json.load(open(again["preference"]))) == 2
    small(tmp_path / "plain")  # back to 0: the stale file goes
    assert not os.path.exists(again["preference"])


def test_the_companion_shape_is_a_habit_of_the_text_never_a_shape_of_the_scene():
    """Noisy descriptions add the scene's companion: decided by the caption's first shape (the same for every scene
    that starts with it, so learnable from the text), with a colour and a kind no shape of the scene has."""
    rng = random.Random(0)
    for _ in range(200):
        scene = synthetic.random_scene(rng)
        extra = synthetic.companion(scene)
        assert extra.colour not in {s.colour for s in scene} and extra.kind not in {s.kind for s in scene}
        assert extra.position not in {s.position for s in scene}
        if len(scene) == 1:
            assert extra == synthetic.companion([dataclasses.replace(scene[0])])  # the first shape decides
    red_circle = synthetic.Shape("red", "circle", "left")
    assert synthetic.companion([red_circle]) == synthetic.Shape("green", "square", "right")
