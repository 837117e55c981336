"""Tokenizers and processors of the LLaVA families: what prepare tokenizes and counts image tokens with, what a
fresh model is assembled beside (`build.assemble`), what the export saves and what serving loads back.

transformers owns the processors (`LlavaProcessor`, `LlavaNextProcessor`, `LlavaOnevisionProcessor`); this module
builds them from the base models' own files for a family and layout. The one class of its own,
`ImageOnlyOnevisionProcessor`, stands in for OneVision's processor where torchvision (which every transformers video
processor needs) is not installed.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from transformers import (
    AddedToken,
    AutoImageProcessor,
    AutoTokenizer,
    LlavaImageProcessor,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionProcessor,
    LlavaProcessor,
)
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import SizeDict
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available
from transformers.video_utils import make_batched_videos

from llava_core import storage
from llava_core.model.chat_template import ONEVISION_CHAT_TEMPLATE, VICUNA_V1_CHAT_TEMPLATE
from llava_core.model.families import (
    Family,
    feature_select_strategy,
    features_per_view,
    tower_config_of,
    tower_has_cls,
    vision_aspect_ratio,
)
from llava_core.model.tokens import IMAGE_TOKEN, PAD_TOKEN, VIDEO_TOKEN


def load_tokenizer(llm_path: str, media_tokens: tuple[str, ...] = (IMAGE_TOKEN,)):
    """The LLM's tokenizer with `<image>` (and `<video>`) added as special tokens where missing and `<pad>` where it
    has no pad token (Vicuna has neither), as transformers' LLaVA conversions add them. `add_tokens` keeps the
    tokenizer's own special tokens (Qwen2's `<|im_start|>`) listed; replacing `additional_special_tokens` would drop
    them."""
    tokenizer = AutoTokenizer.from_pretrained(storage.local_copy(llm_path, without_weights=True))
    missing = [t for t in media_tokens if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def load_image_processor(vision_path: str):
    """The vision tower's image processor (a legacy CLIPFeatureExtractor config loads too); reads no weights."""
    return AutoImageProcessor.from_pretrained(storage.local_copy(vision_path, without_weights=True))


LLAVA_IMAGE_SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                        "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def llava_image_processor(vision_path: str, layout: str = "pad") -> LlavaImageProcessor:
    """LLaVA-1.5's image steps as transformers' `LlavaImageProcessor`: the tower's resize, crop and normalisation,
    after a pad to a square of `int(mean x 255)` when `layout` is `pad` (the official `expand2square`). Prepare,
    training and serving use it, and the export saves it, so any reader of the export sees the trained pixels."""
    tower = load_image_processor(vision_path).to_dict()
    return LlavaImageProcessor(**{key: tower[key] for key in LLAVA_IMAGE_SETTINGS if key in tower},
                               do_pad=layout == "pad")


def base_processor(fam: Family, vision_path: str, llm_path: str, template: str, layout: str):
    """The processor a model of `fam` with `layout` (`prepare.image_aspect_ratio`) is trained and served with, from
    the base models' files alone (no weights): what prepare tokenizes, crops or tiles and counts image tokens with,
    and what `build.assemble` puts beside a fresh model (and so what the export saves)."""
    tokenizer = load_tokenizer(llm_path, fam.media_tokens)
    chat_template = processor_chat_template(fam, template, tokenizer)
    return build_processor(fam, vision_path, tokenizer, tower_config_of(fam, vision_path), chat_template, layout)


def processor_chat_template(fam: Family, template: str, tokenizer) -> str:
    """The template the processor renders prompts with. OneVision's LLM template (`chat_template`, Qwen2's ChatML)
    knows no image or video parts, so the processor gets the same ChatML with them."""
    if template == "plain":  # an alignment stage's model: its processor renders the family's own conversations
        template = fam.template
    if template == "vicuna_v1":
        return VICUNA_V1_CHAT_TEMPLATE
    if template != "chat_template":
        raise ValueError(f"template {template!r} has no chat template; use vicuna_v1 or chat_template")
    return ONEVISION_CHAT_TEMPLATE if VIDEO_TOKEN in fam.media_tokens else tokenizer.chat_template


def build_processor(fam: Family, vision_path: str, tokenizer, tower_config, chat_template: str, layout: str):
    """The family's processor with the tower's own image processing (size, mean/std, resample from its
    preprocessor_config.json) and, for the AnyRes families, the layout's tile grids at the tower's resolution."""
    if fam.processor_class is LlavaProcessor:
        return LlavaProcessor(image_processor=llava_image_processor(vision_path, layout), tokenizer=tokenizer,
                              patch_size=tower_config.patch_size, chat_template=chat_template,
                              vision_feature_select_strategy=feature_select_strategy(tower_config),
                              image_token=IMAGE_TOKEN, num_additional_image_tokens=int(tower_has_cls(tower_config)))
    tile = tower_config.image_size
    image_processor = fam.image_processor_class.from_pretrained(
        storage.local_copy(vision_path, without_weights=True), image_grid_pinpoints=fam.pinpoints(tile, layout),
        **square_tiles(fam, tile))
    strategy = feature_select_strategy(tower_config)
    if fam.processor_class is LlavaOnevisionProcessor:
        settings = dict(image_processor=image_processor, tokenizer=tokenizer,
                        num_image_tokens=features_per_view(tower_config), vision_feature_select_strategy=strategy,
                        chat_template=chat_template, image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN,
                        vision_aspect_ratio=vision_aspect_ratio(layout))
        if not is_torchvision_available():
            return ImageOnlyOnevisionProcessor(**settings)
        from transformers import LlavaOnevisionVideoProcessor

        tower_files = storage.local_copy(vision_path, without_weights=True)
        video_processor = LlavaOnevisionVideoProcessor.from_pretrained(tower_files)  # as the conversion builds it
        return LlavaOnevisionProcessor(video_processor=video_processor, **settings)
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=tower_config.patch_size,
        vision_feature_select_strategy=strategy, chat_template=chat_template, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=int(tower_has_cls(tower_config)))


def square_tiles(fam: Family, tile: int) -> dict:
    """LLaVA-NeXT's image processor centre-crops every tile to `crop_size` (224 px unless the tower's config says
    otherwise, and SigLIP's says nothing): crop to the tower's own size, so a tile is never cut."""
    if fam.image_processor_class is LlavaNextImageProcessor:
        return {"crop_size": {"height": tile, "width": tile}}
    return {}


def image_token_counts(processor, sizes: list[tuple[int, int]], fam: Family) -> list[int]:
    """The `<image>` tokens each image of one sample expands to, from its (height, width) alone: what the processor
    puts in the prompt and the model fills with features (tests/unit/test_anyres_token_counts.py holds them equal).
    OneVision gives each image of a several-image sample its base view and one newline only."""
    if fam.base_view_for_several_images and len(sizes) > 1:
        per_image = processor.num_image_tokens + 1 - int(processor.vision_feature_select_strategy == "default")
        return [per_image] * len(sizes)
    return list(processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"])


class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """transformers' LlavaOnevisionProcessor with `OnevisionFrameProcessor` in its video slot. transformers 5.x builds
    that processor only with a video processor (ProcessorMixin checks every slot's class and refuses None), and every
    video processor needs torchvision, which a CPU-only install may not have. The image-token counting, chat template,
    tokenizing and the `<video>` expansion (`replace_video_token`) are the parent's own; only the frames' pixels come
    from the small frame processor, kept outside the mixin's slots so that saving writes what it did before."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token=IMAGE_TOKEN,
                 video_token=VIDEO_TOKEN, vision_aspect_ratio="anyres_max_9", **kwargs):
        # The parent's settings, set as its __init__ sets them; then the mixin with only the two slots filled.
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = OnevisionFrameProcessor(image_processor)  # what ProcessorMixin's video path calls

    def to_dict(self) -> dict:
        """Saved as the LlavaOnevisionProcessor it stands for, with the video processor transformers' OneVision
        conversion builds from the tower's preprocessor config: `AutoProcessor` then loads the full processor
        wherever torchvision is installed, and `load_processor` loads this one where it is not."""
        saved = super().to_dict()
        saved["processor_class"] = LlavaOnevisionProcessor.__name__
        saved["video_processor"] = onevision_video_processor_dict(self.image_processor)
        return saved


class OnevisionFrameProcessor:
    """What LlavaOnevisionVideoProcessor does to a video, without torchvision: every frame squashed to the image
    processor's `size` (height, width) with its own resize (PIL, its `resample`: bicubic for OneVision), then its own
    rescale and normalisation with the tower's mean and std. Prepare stores `squash`'s uint8 frames, the trainer
    finishes them with `images.normalisation`'s affine, serving calls the whole: one frame path for all three."""

    model_input_names = ["pixel_values_videos"]

    def __init__(self, image_processor):
        self.image_processor = pil_image_processor(image_processor)

    def squash(self, frames) -> np.ndarray:
        """(frames, 3, height, width) uint8: each frame (RGB PIL image or (h, w, 3) uint8 array) resized to `size`.
        PIL resizes in 8 bits, so this is exactly what the float pixels are computed from."""
        ip = self.image_processor
        size = SizeDict(height=ip.size["height"], width=ip.size["width"])
        chw = [np.moveaxis(np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame), -1, 0)
               for frame in frames]
        return np.stack([ip.resize(image=np.ascontiguousarray(f), size=size, resample=ip.resample) for f in chw])

    def finish(self, squashed: np.ndarray) -> np.ndarray:
        """Squashed uint8 frames -> the model's float32 pixels, by the image processor's own rescale and normalise."""
        ip = self.image_processor
        pixels = [ip.rescale(f, ip.rescale_factor) if ip.do_rescale else f.astype(np.float32) for f in squashed]
        if ip.do_normalize:
            pixels = [ip.normalize(f, ip.image_mean, ip.image_std) for f in pixels]
        return np.stack(pixels).astype(np.float32)

    def __call__(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        """`pixel_values_videos` (videos, frames, 3, height, width) of a list of videos, each a sequence of frames
        or a (frames, h, w, 3) array (transformers' `make_batched_videos` forms). A batch's videos must have equal
        frame counts (the model stacks them)."""
        pixels = [self.finish(self.squash(list(video))) for video in make_batched_videos(videos)]
        if len({p.shape[0] for p in pixels}) > 1:
            raise ValueError(f"the videos of one batch must have the same number of frames, got "
                             f"{[p.shape[0] for p in pixels]}")
        return BatchFeature({"pixel_values_videos": np.stack(pixels)}, tensor_type=return_tensors)


def pil_image_processor(image_processor):
    """The image processor's PIL backend with its resize, rescale and normalisation settings: where torchvision is
    installed transformers builds the torchvision backend, whose functions take tensors and resize with torch."""
    if getattr(image_processor, "backend", "pil") == "pil":
        return image_processor
    from transformers import LlavaOnevisionImageProcessorPil

    settings = image_processor.to_dict()
    return LlavaOnevisionImageProcessorPil(**{key: settings[key] for key in VIDEO_PROCESSOR_KEYS})


def frame_processor(processor) -> OnevisionFrameProcessor:
    """The frame path of a OneVision processor, whichever video processor it holds: prepare, training and serving
    squash frames with this one, so a torchvision video processor (torch's bicubic) only ever sees frames already at
    its size."""
    return OnevisionFrameProcessor(processor.image_processor)


def video_token_count(processor, frames: int, height: int, width: int) -> int:
    """The `<video>` tokens a video of `frames` frames expands to: frames x pooled features + one newline."""
    return processor._get_num_multimodal_tokens(video_sizes=[(frames, height, width)])["num_video_tokens"][0]


VIDEO_PROCESSOR_KEYS = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                        "resample", "rescale_factor", "size")


def onevision_video_processor_dict(image_processor) -> dict:
    """`LlavaOnevisionVideoProcessor.from_pretrained(tower)`'s settings, as saved: the tower's resize, rescale and
    normalisation, every frame squashed to the tower's size."""
    settings = image_processor.to_dict()
    return {"video_processor_type": "LlavaOnevisionVideoProcessor", "default_to_square": False,
            "do_sample_frames": False, **{k: settings[k] for k in VIDEO_PROCESSOR_KEYS}}


def load_processor(path: str, model_type: str):
    """A saved model's processor: `AutoProcessor`'s, except a OneVision processor without torchvision, which loads
    as `ImageOnlyOnevisionProcessor` (images and frames) instead of degrading to a bare tokenizer. Its tokenizer
    keeps the class the directory names (`SOURCE_TOKENIZER_CLASS`): transformers 5 distrusts the one LLaVA repos
    name and loads them as its generic `TokenizersBackend`, and would save them under that name, which transformers
    4 (and vLLM with it) cannot load."""
    from transformers import AutoProcessor

    if model_type == "llava_onevision" and not is_torchvision_available():
        processor = ImageOnlyOnevisionProcessor.from_pretrained(path)
    else:
        processor = AutoProcessor.from_pretrained(path)
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        setattr(processor.tokenizer, SOURCE_TOKENIZER_CLASS, json.load(f).get("tokenizer_class"))
    return processor


def saved_processor(path: str):
    """A saved model's processor (`load_processor`), local or a storage URI, read without its weights."""
    local = storage.local_copy(path, without_weights=True)
    with open(os.path.join(local, "config.json")) as f:
        return load_processor(local, json.load(f)["model_type"])


SOURCE_TOKENIZER_CLASS = "llava_ray_source_tokenizer_class"
