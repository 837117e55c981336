"""The tiny vision tower's pretraining on the synthetic scenes' per-patch labels (the labels themselves:
tests/unit/test_synthetic.py)."""
import torch

from llava_core.quickstart import standins, synthetic
from llava_core.quickstart.bootstrap import labelled_scene_batches


def test_pretraining_teaches_the_tower_what_each_patch_shows():
    cfg = standins.TinyModelConfig(vision_layers=2, vision_hidden=64, tower_pretraining_steps=120)
    processor = standins.tiny_image_processor(cfg)
    batches = labelled_scene_batches(processor, cfg, batch_size=32, pool=512)
    pixels, labels = next(batches)
    assert pixels.shape == (32, 3, 64, 64) and labels.shape == (32, 64, 3)
    assert 0.05 < (labels[..., 0] > 0).float().mean() < 0.5  # shapes cover some patches, never all
    torch.manual_seed(0)
    tower = standins.vision_tower(cfg)
    colour, shape, position = standins.pretrain_vision_tower(tower, batches, synthetic.PATCH_LABEL_CLASSES,
                                                             cfg.tower_pretraining_steps)
    # Chance on a kind's labelled patches is 1 / its classes (colour 0.25, shape 0.33, position 0.25); a tower that
    # learned nothing stays near it. Measured after 120 steps: 0.95, 0.49, 0.79.
    assert colour > 0.7 and shape > 0.4 and position > 0.55, (colour, shape, position)
    assert not tower.training
