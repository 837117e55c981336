"""What each LLaVA family is: its transformers classes, how it lays an image out, which tower features it reads,
and how a fresh model of it is assembled from a vision tower and an LLM.

- `llava` (LLaVA-1.5): one 336 px view per image, padded to a square (`pad`); CLIP ViT-L/14-336 + Vicuna.
- `llava_next` (LLaVA-NeXT / 1.6): `anyres`: the image is resized into the best of five tile grids (1x2, 2x1, 2x2,
  3x1, 1x3 tiles of the tower's size), each tile and a downscaled global view encoded on their own, the tile
  features unpadded to the image's aspect ratio, and a learned `image_newline` ends every feature row.
- `llava_onevision`: "Higher AnyRes" (`anyres_max_9`): grids up to 6x6 tiles, and when the unpadded feature map
  holds more than ~9 tiles' worth of features (ratio > 1.1) it is bilinearly shrunk to about that budget. SigLIP
  so400m/14-384 (27 x 27 = 729 features a view, no CLS token) with its last layer dropped, + Qwen2.

Facts and their sources: the pinpoints are transformers' `LlavaNextConfig` / `LlavaOnevisionConfig` defaults, the
same lists LLaVA-NeXT's training scripts give (`--image_grid_pinpoints "[(336, 672), (672, 336), (672, 672),
(1008, 336), (336, 1008)]"`; OneVision's `"(1x1),...,(6x6)"` times the tower's 384 px, llava/mm_utils.py). The
OneVision tower settings are those of transformers' convert_llava_onevision_weights_to_hf.py
(`SiglipVisionConfig(num_hidden_layers=26, vision_use_head=False)`, `vision_feature_select_strategy="full"`, the
config's `vision_feature_layer=-1`), which is what LLaVA-NeXT's siglip_encoder.py does (`del layers[-1:]`, head =
Identity, `hidden_states[-1]`) and equals layer -2 of the full 27-layer tower.

transformers owns the models and processors; this module only picks and wires them. `llava` models are built by
`build.assemble_llava`, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import (
    AddedToken,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    SiglipVisionModel,
)
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import SizeDict
from transformers.initialization import no_init_weights
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available
from transformers.video_utils import make_batched_videos

from llava_core import storage
from llava_core.model.build import (
    IMAGE_TOKEN,
    PAD_TOKEN,
    assemble_llava,
    new_projector,
    pad_embeddings,
    set_generation_defaults,
    vision_config,
)
from llava_core.model.chat_template import ONEVISION_CHAT_TEMPLATE, VICUNA_V1_CHAT_TEMPLATE
from llava_core.model.zero3 import zero3_paused

VIDEO_TOKEN = "<video>"

# Tile grids as (rows, columns) of tower-sized tiles; pinpoints are these times the tower's image size.
NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
ONEVISION_GRIDS = tuple((rows, cols) for rows in range(1, 7) for cols in range(1, 7))


@dataclass(frozen=True)
class Family:
    name: str
    model_class: type
    config_class: type
    processor_class: type
    image_processor_class: type
    image_layout: str  # LLaVA's `image_aspect_ratio`: "pad", "anyres" or "anyres_max_<tiles>"
    grids: tuple[tuple[int, int], ...]  # () for a single view
    vision_feature_layer: int
    vision_feature_select_strategy: str  # of the family's own tower: "default" drops CLIP's CLS, "full" keeps all
    drops_last_tower_layer: bool  # OneVision's conversion cuts the tower's last layer and reads layer -1
    media_tokens: tuple[str, ...]
    base_view_for_several_images: bool  # OneVision: an image of a several-image sample is its base view alone
    template: str  # the workflow `template` its checkpoints train with
    vision_tower: str  # the hub repos of its reference checkpoints
    llm: str

    def pinpoints(self, tile: int, layout: str | None = None) -> list[list[int]]:
        """The (height, width) resolutions an image may be tiled into, for a tower of `tile` px. Layout `pad` is one
        1x1 grid: the image at the tower's base size only (what AnyRes is measured against)."""
        grids = ((1, 1),) if layout == "pad" else self.grids
        return [[rows * tile, cols * tile] for rows, cols in grids]

    def takes_image_sizes(self) -> bool:
        """AnyRes families: the model needs each image's (height, width) to find its tiles."""
        return bool(self.grids)

    def takes_videos(self) -> bool:
        return VIDEO_TOKEN in self.media_tokens


FAMILIES = {
    "llava": Family(
        "llava", LlavaForConditionalGeneration, LlavaConfig, LlavaProcessor, LlavaImageProcessor, "pad", (),
        vision_feature_layer=-2, vision_feature_select_strategy="default", drops_last_tower_layer=False,
        media_tokens=(IMAGE_TOKEN,), base_view_for_several_images=False, template="vicuna_v1",
        vision_tower="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5"),
    "llava_next": Family(
        "llava_next", LlavaNextForConditionalGeneration, LlavaNextConfig, LlavaNextProcessor, LlavaNextImageProcessor,
        "anyres", NEXT_GRIDS, vision_feature_layer=-2, vision_feature_select_strategy="default",
        drops_last_tower_layer=False, media_tokens=(IMAGE_TOKEN,), base_view_for_several_images=False,
        template="vicuna_v1",
        vision_tower="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5"),
    "llava_onevision": Family(
        "llava_onevision", LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig, LlavaOnevisionProcessor,
        LlavaOnevisionImageProcessor, "anyres_max_9", ONEVISION_GRIDS, vision_feature_layer=-1,
        vision_feature_select_strategy="full", drops_last_tower_layer=True, media_tokens=(IMAGE_TOKEN, VIDEO_TOKEN),
        base_view_for_several_images=True, template="chat_template", vision_tower="google/siglip-so400m-patch14-384",
        llm="Qwen/Qwen2-7B-Instruct"),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {list(FAMILIES)}")
    return FAMILIES[name]


def tower_has_cls(tower_config) -> bool:
    """CLIP towers put a CLS token before the patch features; SigLIP towers have none."""
    return tower_config.model_type.startswith("clip")


def feature_select_strategy(tower_config) -> str:
    """Drop the CLS token where there is one, keep every feature where there is none: what each family's own tower
    uses ("default" for CLIP, "full" for SigLIP), and the only choice that leaves a square grid of patch features."""
    return "default" if tower_has_cls(tower_config) else "full"


def features_per_view(tower_config) -> int:
    """Patch features one view gives: 576 for CLIP ViT-L/14-336, 729 for SigLIP so400m/14-384."""
    return (tower_config.image_size // tower_config.patch_size) ** 2


# --- assembling a fresh model ------------------------------------------------------------------------------------


def assemble(name: str, vision_path: str, llm_path: str, dtype: torch.dtype = torch.float32,
             template: str | None = None, attn_implementation: str = "sdpa", device: torch.device | None = None,
             layout: str | None = None):
    """A fresh model of family `name` (pretrained vision tower and LLM, new projector and, for the AnyRes families,
    a new `image_newline`) and its processor. `template` and `layout` (`prepare.image_aspect_ratio`) default to the
    family's own."""
    fam = family(name)
    template = template or fam.template
    if fam.name == "llava":
        return assemble_llava(vision_path, llm_path, dtype, template, attn_implementation, device,
                              layout or fam.image_layout)
    return assemble_anyres(fam, vision_path, llm_path, dtype, template, attn_implementation, device,
                           layout or fam.image_layout)


def assemble_anyres(fam: Family, vision_path: str, llm_path: str, dtype: torch.dtype, template: str,
                    attn_implementation: str, device: torch.device | None, layout: str):
    """`assemble_llava` for LLaVA-NeXT and LLaVA-OneVision: the same loading and meta-device shell, plus the tile
    layout in the config and processor and a learned row-end embedding."""
    vision_path, llm_path = storage.local_copy(vision_path), storage.local_copy(llm_path)
    processor = load_anyres_processor(fam, vision_path, llm_path, template, layout)
    tokenizer = processor.tokenizer
    placement = {"device_map": {"": device}} if device is not None else {}
    vision = load_vision_tower(fam, vision_path, dtype, attn_implementation, placement)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, attn_implementation=attn_implementation,
                                               **placement)
    padded_vocab = pad_embeddings(llm, len(tokenizer))

    config = anyres_config(fam, vision.config, llm.config, tokenizer, layout)
    with torch.device("meta"), no_init_weights(), zero3_paused():
        model = fam.model_class(config)
    projector_class = type(model.model.multi_modal_projector)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector = new_projector(config, dtype, device, projector_class)
    model.model.image_newline = new_image_newline(llm.config.hidden_size, dtype, device)
    model.config.text_config = llm.config
    model.set_attn_implementation(attn_implementation)
    set_generation_defaults(model, tokenizer, padded_vocab)
    return model, processor


def load_anyres_processor(fam: Family, vision_path: str, llm_path: str, template: str, layout: str):
    """The processor a model of `fam` with `layout` is trained and served with, from the base models' files alone
    (no weights): what prepare counts image tokens with and what the model's config is built beside."""
    tokenizer = load_tokenizer_with_media_tokens(llm_path, fam.media_tokens)
    tower_config = tower_config_of(fam, vision_path)
    chat_template = processor_chat_template(fam, template, tokenizer)
    return build_anyres_processor(fam, vision_path, tokenizer, tower_config, chat_template, layout)


def tower_config_of(fam: Family, vision_path: str):
    """The tower's config as the family runs it (OneVision: one layer fewer, no pooling head)."""
    config = vision_config(vision_path)
    for key, value in tower_cut(fam, config).items():
        setattr(config, key, value)
    return config


def image_token_counts(processor, sizes: list[tuple[int, int]], fam: Family) -> list[int]:
    """The `<image>` tokens each image of one sample expands to, from its (height, width) alone: what the processor
    puts in the prompt and the model fills with features (tests/test_anyres_token_counts.py holds them equal).
    OneVision gives each image of a several-image sample its base view and one newline only."""
    if fam.base_view_for_several_images and len(sizes) > 1:
        per_image = processor.num_image_tokens + 1 - int(processor.vision_feature_select_strategy == "default")
        return [per_image] * len(sizes)
    return list(processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"])


def load_tokenizer_with_media_tokens(llm_path: str, media_tokens: tuple[str, ...]):
    """The LLM's tokenizer with `<image>` (and `<video>`) added as special tokens and `<pad>` where it has no pad
    token, as transformers' LLaVA-NeXT / OneVision conversions add them. `add_tokens` keeps the tokenizer's own
    special tokens (Qwen2's `<|im_start|>`) listed; replacing `additional_special_tokens` would drop them."""
    tokenizer = AutoTokenizer.from_pretrained(storage.local_copy(llm_path, without_weights=True))
    missing = [t for t in media_tokens if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


TOWER_CLASSES = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}


def load_vision_tower(fam: Family, vision_path: str, dtype: torch.dtype, attn_implementation: str, placement: dict):
    """The vision half of a full CLIP / SigLIP repo; for OneVision without its last layer and its pooling head,
    which LLaVA never runs (their weights are left unread)."""
    tower_config = vision_config(vision_path)
    tower_class = TOWER_CLASSES[tower_config.model_type]
    return tower_class.from_pretrained(vision_path, dtype=dtype, attn_implementation=attn_implementation,
                                       **tower_cut(fam, tower_config), **placement)


def tower_cut(fam: Family, tower_config) -> dict:
    if not fam.drops_last_tower_layer:
        return {}
    cut = {"num_hidden_layers": tower_config.num_hidden_layers - 1}
    if hasattr(tower_config, "vision_use_head"):
        cut["vision_use_head"] = False
    return cut


def vision_aspect_ratio(layout: str) -> str:
    """OneVision's feature budget: `anyres_max_N` as the layout says; one 1x1 grid (`pad`) never reaches one."""
    return layout if layout.startswith("anyres_max") else "anyres_max_9"


def anyres_config(fam: Family, tower_config, text_config, tokenizer, layout: str):
    media = {"image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
    if VIDEO_TOKEN in fam.media_tokens:
        media["video_token_index"] = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    budget = {"vision_aspect_ratio": vision_aspect_ratio(layout)} if fam.image_layout.startswith("anyres_max") else \
        {"image_seq_length": features_per_view(tower_config)}
    config = fam.config_class(
        vision_config=tower_config, text_config=text_config, **media, **budget,
        image_grid_pinpoints=fam.pinpoints(tower_config.image_size, layout),
        projector_hidden_act="gelu",
        vision_feature_layer=fam.vision_feature_layer,
        vision_feature_select_strategy=feature_select_strategy(tower_config),
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def new_image_newline(hidden_size: int, dtype: torch.dtype, device: torch.device | None) -> torch.nn.Parameter:
    """The learned embedding that ends each row of tile features, initialised as transformers does (std
    1/sqrt(hidden)). Under ZeRO-3 it is made whole on every rank and the engine converts it when it wraps the model
    (DeepSpeedZeRoOffload._convert_to_zero_parameters broadcasts rank 0's copy, then partitions it); no test runs
    that path yet."""
    return torch.nn.Parameter(torch.randn(hidden_size, dtype=dtype, device=device) / hidden_size ** 0.5)


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


def build_anyres_processor(fam: Family, vision_path: str, tokenizer, tower_config, chat_template: str, layout: str):
    """The family's processor with the tower's own image processing (size, mean/std, resample from its
    preprocessor_config.json) and the layout's tile grids at the tower's resolution."""
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
    as `ImageOnlyOnevisionProcessor` (images and frames) instead of degrading to a bare tokenizer."""
    from transformers import AutoProcessor

    if model_type == "llava_onevision" and not is_torchvision_available():
        return ImageOnlyOnevisionProcessor.from_pretrained(path)
    return AutoProcessor.from_pretrained(path)


def model_class_of(path: str, model_type: str) -> type:
    """The transformers class a saved LLaVA checkpoint of any family loads as, from its config's model_type."""
    if model_type not in FAMILIES:
        raise ValueError(f"{path} holds a {model_type!r} model, not one of the LLaVA families {list(FAMILIES)}")
    return FAMILIES[model_type].model_class
