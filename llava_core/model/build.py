"""Build a LLaVA model from a vision encoder and a language model, the same way for a 7B run and for a test.

`assemble_llava` takes two directories (or hub ids) in Hugging Face format, e.g. `openai/clip-vit-large-patch14-336`
and `lmsys/vicuna-7b-v1.5`, and returns transformers' own `LlavaForConditionalGeneration` with a fresh LLaVA-1.5
projector (Linear, GELU, Linear) plus a matching `LlavaProcessor`. The quickstart calls it on tiny models that
`llava_core.model.standins` saves to disk first, so the code path is the one a real cluster runs.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
)
from transformers.initialization import no_init_weights
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from llava_core import storage
from llava_core.model.chat_template import VICUNA_V1_CHAT_TEMPLATE
from llava_core.model.zero3 import gathered, zero3_paused

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def load_tokenizer_with_image_token(llm_path: str):
    """The LLM's tokenizer with `<image>` and `<pad>` added where missing (Vicuna has neither), as the HF
    conversion of LLaVA does."""
    tokenizer = AutoTokenizer.from_pretrained(storage.local_copy(llm_path, without_weights=True))
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
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


def build_processor(vision_path: str, tokenizer, patch_size: int, chat_template: str = VICUNA_V1_CHAT_TEMPLATE,
                    layout: str = "pad"):
    return LlavaProcessor(
        image_processor=llava_image_processor(vision_path, layout),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )


def vision_config(vision_path: str):
    """The vision tower's own config: the nested `vision_config` of a full CLIP repo (`CLIPConfig`, as
    `openai/clip-vit-large-patch14-336` ships), or the config itself for a bare vision model."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(storage.local_copy(vision_path, without_weights=True))
    return getattr(config, "vision_config", None) or config


def image_seq_length(vision_config) -> int:
    """Image tokens per image: one per patch (the CLS token is dropped). 576 for CLIP ViT-L/14 at 336 px."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def assemble_llava(vision_path: str, llm_path: str, dtype: torch.dtype = torch.float32, template: str = "vicuna_v1",
                   attn_implementation: str = "sdpa", device: torch.device | None = None, layout: str = "pad"):
    """A fresh LLaVA-1.5 model (pretrained vision tower and LLM, new projector) and its processor, whose chat template
    renders `template`'s inference prompt (the LLM tokenizer's own for `chat_template`) and whose image processor
    pads to a square when `layout` (`prepare.image_aspect_ratio`) is `pad`.

    The paths are local directories, hub ids or storage URIs (`s3://`, mirrored to this process's own disk). Weights
    load in `dtype`, straight onto `device` when given; under an active ZeRO-3 config (training) every part loads
    partitioned across the ranks instead."""
    vision_path, llm_path = storage.local_copy(vision_path), storage.local_copy(llm_path)
    tokenizer = load_tokenizer_with_image_token(llm_path)
    placement = {"device_map": {"": device}} if device is not None else {}
    vision = CLIPVisionModel.from_pretrained(vision_path, dtype=dtype, attn_implementation=attn_implementation,
                                             **placement)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, attn_implementation=attn_implementation,
                                               **placement)
    padded_vocab = pad_embeddings(llm, len(tokenizer))

    config = LlavaConfig(
        vision_config=vision.config,
        text_config=llm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_seq_length(vision.config),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    config.pad_token_id = tokenizer.pad_token_id
    # Build the shell on the meta device, uninitialised, then move the loaded parts in: no second copy of a 7B LLM.
    with torch.device("meta"), no_init_weights(), zero3_paused():
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector = new_projector(config, dtype, device)
    model.config.text_config = llm.config
    model.set_attn_implementation(attn_implementation)
    set_generation_defaults(model, tokenizer, padded_vocab)

    chat_template = tokenizer.chat_template if template == "chat_template" else VICUNA_V1_CHAT_TEMPLATE
    processor = build_processor(vision_path, tokenizer, patch_size=vision.config.patch_size,
                                chat_template=chat_template, layout=layout)
    return model, processor


EMBEDDING_MULTIPLE = 64  # tensor-core friendly vocabulary sizes: 32002 tokens -> 32064 rows, as llava-hf's models


def embedding_rows(rows: int, tokens: int) -> int:
    """Rows the LLM's embeddings and lm_head get for a tokenizer of `tokens`: as they are when they hold every token
    (Qwen2's 152064 rows), else `tokens` rounded up to a multiple of 64 (Vicuna's 32000 + `<image>` + `<pad>`)."""
    return rows if rows >= tokens else -(-tokens // EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE


def pad_embeddings(llm, tokens: int) -> int:
    """Grow the LLM's embeddings and lm_head to `embedding_rows`; returns the rows it has."""
    rows = embedding_rows(llm.get_input_embeddings().num_embeddings, tokens)
    if rows != llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(tokens, pad_to_multiple_of=EMBEDDING_MULTIPLE)
    return llm.get_input_embeddings().num_embeddings


def set_generation_defaults(model, tokenizer, padded_vocab: int) -> None:
    """Pad and end-of-sequence tokens from the tokenizer; rows no token maps to are never generated."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if padded_vocab > len(tokenizer):
        model.generation_config.suppress_tokens = list(range(len(tokenizer), padded_vocab))


def new_projector(config, dtype: torch.dtype, device: torch.device | None,
                  projector_class: type = LlavaMultiModalProjector):
    """A freshly initialised projector (LLaVA-1.5's unless `projector_class` says otherwise): partitioned under
    ZeRO-3 (in the config's dtype, which is `dtype`), as transformers builds models there; else on `device` (the host
    when None)."""
    from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
            return projector_class(config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return projector_class(config).to(dtype)


def load_llava(path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
               device: torch.device | None = None):
    """A LLaVA checkpoint of any family in HF format (this project's stage outputs and exports, or llava-hf/*
    models) as its family's transformers class, local or a storage URI; partitioned as it loads under an active
    ZeRO-3 config."""
    from transformers import AutoConfig

    from llava_core.model.families import load_processor, model_class_of

    path = storage.local_copy(path)
    model_type = AutoConfig.from_pretrained(path).model_type
    placement = {"device_map": {"": device}} if device is not None else {}
    model = model_class_of(path, model_type).from_pretrained(path, dtype=dtype,
                                                             attn_implementation=attn_implementation, **placement)
    return model, load_processor(path, model_type)


OFFICIAL_PROJECTOR_KEYS = {"linear_1.": "model.mm_projector.0.", "linear_2.": "model.mm_projector.2."}


def official_projector_bytes(projector: torch.nn.Module) -> bytes:
    """The projector as the official stage 1 saves it (`mm_projector.bin`, keys `model.mm_projector.{0,2}.*`): the
    whole hand-off from alignment to instruction tuning, ~40 MB for 7B instead of a 14 GB model copy."""
    import io

    state = {}
    for key, value in projector.state_dict().items():
        for ours, official in OFFICIAL_PROJECTOR_KEYS.items():
            if key.startswith(ours):
                state[official + key[len(ours):]] = value.detach().cpu().clone()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_official_projector(model, projector_path: str) -> None:
    """Load an official LLaVA `mm_projector.bin` (keys `model.mm_projector.{0,2}.{weight,bias}`) into the model."""
    import io

    state = torch.load(io.BytesIO(storage.read_bytes(projector_path)), map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in state.items():
        for ours, official in OFFICIAL_PROJECTOR_KEYS.items():
            key = key.replace(official, ours)
        renamed[key] = value
    projector = model.model.multi_modal_projector
    with gathered(list(projector.parameters()), modifier_rank=0):  # every rank reads the file; rank 0's copy wins
        missing, unexpected = projector.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise ValueError(f"{projector_path} is not a LLaVA mlp2x_gelu projector: missing {missing}, unexpected "
                         f"{unexpected}; expected keys model.mm_projector.0/2.weight|bias")
    log.info("loaded the official projector %s", projector_path)
