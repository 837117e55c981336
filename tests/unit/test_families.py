"""Each family is what transformers and the LLaVA-NeXT code say it is, and assembles from a tower and an LLM into a
model and processor that run together (tiny stand-ins at small tiles; the token-count test runs real tile sizes)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from llava_core.model import build, families
from llava_core.quickstart import standins

CLIP, SIGLIP = "openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384"
VICUNA, QWEN2 = "lmsys/vicuna-7b-v1.5", "Qwen/Qwen2-7B-Instruct"


def test_the_families_layouts_are_transformers_and_llava_next_own():
    from transformers import LlavaNextConfig, LlavaOnevisionConfig, LlavaOnevisionImageProcessor

    next_, onevision = families.family("llava_next"), families.family("llava_onevision")
    # LLaVA-NeXT's scripts: --image_grid_pinpoints "[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]"
    assert next_.pinpoints(336) == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert next_.pinpoints(336) == LlavaNextConfig().image_grid_pinpoints
    # OneVision's "(1x1),...,(6x6)" tiles of 384 px: up to 2304 x 2304
    assert onevision.pinpoints(384) == LlavaOnevisionConfig().image_grid_pinpoints
    assert onevision.pinpoints(384) == LlavaOnevisionImageProcessor().image_grid_pinpoints
    assert (onevision.image_layout, onevision.vision_feature_layer) == ("anyres_max_9", -1)
    assert onevision.image_layout == LlavaOnevisionConfig().vision_aspect_ratio
    assert families.family("llava").image_layout == "pad" and families.family("llava").grids == ()
    with pytest.raises(KeyError, match="llava_onevision"):
        families.family("llava_2")


def test_each_family_reads_its_own_tower_as_its_checkpoints_do():
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    clip = CLIPVisionConfig(image_size=336, patch_size=14)
    siglip = SiglipVisionConfig(image_size=384, patch_size=14)
    assert families.features_per_view(clip) == 576 and families.features_per_view(siglip) == 729
    for fam in families.FAMILIES.values():
        tower = siglip if fam.vision_tower == SIGLIP else clip
        assert families.feature_select_strategy(tower) == fam.vision_feature_select_strategy
    assert families.feature_select_strategy(siglip) == "full"  # no CLS to drop, whichever family reads it


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hub"))
    corpus = ["a red circle on the left", "What colour is the shape?", "blue", "Describe the video."] * 10
    cfg = standins.TinyModelConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=3, llm_hidden=64,
                                   llm_layers=1, llm_heads=4, vocab_size=400)
    for hub_id in (CLIP, SIGLIP, VICUNA, QWEN2):
        standins.save_standin(hub_id, os.path.join(root, hub_id), corpus, cfg)
    return lambda hub_id: os.path.join(root, hub_id)


def image_prompt(processor, images: int = 1) -> str:
    parts = [{"type": "image"}] * images + [{"type": "text", "text": "What colour is the shape?"}]
    return processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)


def test_llava_next_assembles_with_anyres_and_a_fresh_image_newline(hub):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

    torch.manual_seed(0)
    model, processor = build.assemble("llava_next", hub(CLIP), hub(VICUNA))
    assert isinstance(model, LlavaNextForConditionalGeneration) and isinstance(processor, LlavaNextProcessor)
    assert model.config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints == \
        [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) == (-2, "default")
    assert processor.num_additional_image_tokens == 1 and processor.patch_size == 8  # CLIP's CLS, dropped
    assert isinstance(model.model.multi_modal_projector, LlavaNextMultiModalProjector)
    newline = model.model.image_newline
    assert newline.shape == (64,) and newline.requires_grad and newline.device.type == "cpu"
    assert newline.std().item() == pytest.approx(64 ** -0.5, rel=0.5)  # transformers' init scale, not meta
    assert "USER: <image>\nWhat colour is the shape? ASSISTANT:" in image_prompt(processor)  # vicuna_v1

    inputs = processor(images=Image.new("RGB", (90, 40), (200, 30, 30)), text=image_prompt(processor),
                       return_tensors="pt")
    labels = inputs.input_ids.masked_fill(inputs.input_ids == model.config.image_token_id, -100)
    loss = model(**inputs, labels=labels).loss  # the forward itself checks tokens == features
    loss.backward()
    assert newline.grad is not None and newline.grad.abs().sum() > 0


def test_llava_onevision_assembles_with_siglip_cut_qwen2_and_media_tokens(hub):
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.utils import is_torchvision_available

    torch.manual_seed(0)
    model, processor = build.assemble("llava_onevision", hub(SIGLIP), hub(QWEN2))
    assert isinstance(model, LlavaOnevisionForConditionalGeneration)
    assert isinstance(processor, LlavaOnevisionProcessor)  # image-only without torchvision, same counting
    config = model.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy, config.vision_aspect_ratio) == \
        (-1, "full", "anyres_max_9")
    assert config.image_grid_pinpoints == [[r * 32, c * 32] for r in range(1, 7) for c in range(1, 7)]
    tower = model.model.vision_tower
    assert len(tower.encoder.layers) == 2 and not hasattr(tower, "head")  # 3-layer stand-in, last layer cut
    assert processor.num_image_tokens == 16 and processor.vision_feature_select_strategy == "full"

    tokenizer = processor.tokenizer
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    assert (config.image_token_id, config.video_token_id) == (image_id, video_id) == (len(tokenizer) - 2,
                                                                                      len(tokenizer) - 1)
    rows = model.get_input_embeddings().num_embeddings
    assert rows == standins.qwen2_embedding_rows(len(tokenizer) - 2)  # Qwen2's spare rows hold them: no resize
    assert "<|im_start|>" in tokenizer.all_special_tokens  # adding media tokens kept Qwen2's own specials

    # The processor's ChatML is the Qwen2 LLM's own for text, with images (then videos) first in a turn.
    text_only = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "blue"}]
    assert processor.apply_chat_template(text_only) == tokenizer.apply_chat_template(text_only, tokenize=False)
    video_turn = [{"role": "user", "content": [{"type": "text", "text": "Describe the video."}, {"type": "video"}]}]
    assert processor.apply_chat_template(video_turn).endswith(
        "<|im_start|>user\n<video>\nDescribe the video.<|im_end|>\n")

    image = Image.new("RGB", (100, 30), (20, 200, 30))
    single = processor(images=image, text=image_prompt(processor), return_tensors="pt")
    labels = single.input_ids.masked_fill(single.input_ids == image_id, -100)
    model(**single, labels=labels).loss.backward()
    assert model.model.image_newline.grad.abs().sum() > 0
    # Several images in one prompt: one base view each plus a newline, no tiles.
    multi = processor(images=[[image, image]], text=[image_prompt(processor, images=2)], return_tensors="pt")
    assert (multi.input_ids == image_id).sum() == 2 * (16 + 1)
    with torch.no_grad():
        model(**multi)
    # A video: frames squashed to the tower's size (the frame processor stands in for torchvision's), 2 x 2 pooled
    # features a frame of the 4 x 4 view plus one newline.
    if not is_torchvision_available():
        clip = np.zeros((2, 40, 56, 3), dtype=np.uint8)
        video = processor(videos=[clip], text="<video>", return_tensors="pt")
        assert tuple(video.pixel_values_videos.shape) == (1, 2, 3, 32, 32)
        assert int((video.input_ids == video_id).sum()) == 2 * 4 + 1


def test_llava_assembles_as_before(hub):
    from transformers import LlavaForConditionalGeneration

    model, processor = build.assemble("llava", hub(CLIP), hub(VICUNA))
    assert isinstance(model, LlavaForConditionalGeneration) and type(processor).__name__ == "LlavaProcessor"
