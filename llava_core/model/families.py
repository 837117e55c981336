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

transformers owns the models and processors; this module says which of them a family uses and how (its data), and
reads a tower's config as the family runs it. `processors.py` builds a family's processor, `build.py` its models.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import (
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
)

from llava_core import storage
from llava_core.model.tokens import IMAGE_TOKEN, VIDEO_TOKEN
from llava_core.schema import FAMILY_LAYOUTS

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
    grids: tuple[tuple[int, int], ...]  # () for a single view
    vision_feature_layer: int
    vision_feature_select_strategy: str  # of the family's own tower: "default" drops CLIP's CLS, "full" keeps all
    drops_last_tower_layer: bool  # OneVision's conversion cuts the tower's last layer and reads layer -1
    media_tokens: tuple[str, ...]
    base_view_for_several_images: bool  # OneVision: an image of a several-image sample is its base view alone
    template: str  # the workflow `template` its checkpoints train with
    vision_tower: str  # the hub repos of its reference checkpoints
    llm: str

    @property
    def image_layout(self) -> str:
        """LLaVA's `image_aspect_ratio` its recipes use: "pad", "anyres" or "anyres_max_<tiles>" (schema.py)."""
        return FAMILY_LAYOUTS[self.name]

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
        "llava", LlavaForConditionalGeneration, LlavaConfig, LlavaProcessor, LlavaImageProcessor, (),
        vision_feature_layer=-2, vision_feature_select_strategy="default", drops_last_tower_layer=False,
        media_tokens=(IMAGE_TOKEN,), base_view_for_several_images=False, template="vicuna_v1",
        vision_tower="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5"),
    "llava_next": Family(
        "llava_next", LlavaNextForConditionalGeneration, LlavaNextConfig, LlavaNextProcessor, LlavaNextImageProcessor,
        NEXT_GRIDS, vision_feature_layer=-2, vision_feature_select_strategy="default",
        drops_last_tower_layer=False, media_tokens=(IMAGE_TOKEN,), base_view_for_several_images=False,
        template="vicuna_v1",
        vision_tower="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5"),
    "llava_onevision": Family(
        "llava_onevision", LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig, LlavaOnevisionProcessor,
        LlavaOnevisionImageProcessor, ONEVISION_GRIDS, vision_feature_layer=-1,
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


def vision_config(vision_path: str):
    """The vision tower's own config: the nested `vision_config` of a full CLIP / SigLIP repo (`CLIPConfig`, as
    `openai/clip-vit-large-patch14-336` ships), or the config itself for a bare vision model. Reads no weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(storage.local_copy(vision_path, without_weights=True))
    return getattr(config, "vision_config", None) or config


def tower_config_of(fam: Family, vision_path: str):
    """The tower's config as the family runs it (OneVision: one layer fewer, no pooling head)."""
    config = vision_config(vision_path)
    for key, value in tower_cut(fam, config).items():
        setattr(config, key, value)
    return config


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


def model_class_of(path: str, model_type: str) -> type:
    """The transformers class a saved LLaVA checkpoint of any family loads as, from its config's model_type."""
    if model_type not in FAMILIES:
        raise ValueError(f"{path} holds a {model_type!r} model, not one of the LLaVA families {list(FAMILIES)}")
    return FAMILIES[model_type].model_class
