"""The synthetic scenes' masks and per-patch labels (the tiny vision tower's pretraining on them:
tests/end_to_end/test_synthetic.py)."""
import random

import numpy as np
from PIL import Image

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
