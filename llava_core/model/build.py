"""Build a LLaVA model of any family from a vision encoder and a language model, the same way for a 7B run and for a
test, and load a saved one back.

`assemble` takes two directories (or hub ids) in Hugging Face format, e.g. `openai/clip-vit-large-patch14-336` and
`lmsys/vicuna-7b-v1.5`, and returns transformers' own model class of the family (`LlavaForConditionalGeneration`,
`LlavaNext...`, `LlavaOnevision...`) with a fresh projector (Linear, GELU, Linear) and, for the AnyRes families, a
fresh `image_newline`, plus the family's processor (`processors.base_processor`). The quickstart calls it on tiny
models that `llava_core.quickstart.standins` saves to disk first, so the code path is the one a real cluster runs.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from transformers import AutoModelForCausalLM, CLIPVisionModel, SiglipVisionModel
from transformers.initialization import no_init_weights

from llava_core import storage
from llava_core.model.families import (
    Family,
    family,
    feature_select_strategy,
    features_per_view,
    model_class_of,
    tower_cut,
    vision_aspect_ratio,
    vision_config,
)
from llava_core.model.processors import base_processor, load_processor
from llava_core.model.tokens import IMAGE_TOKEN, VIDEO_TOKEN
from llava_core.model.zero3 import gathered, zero3_paused

log = logging.getLogger(__name__)


def assemble(name: str, vision_path: str, llm_path: str, dtype: torch.dtype = torch.float32,
             template: str | None = None, attn_implementation: str = "sdpa", device: torch.device | None = None,
             layout: str | None = None):
    """A fresh model of family `name` (pretrained vision tower and LLM, new projector and, for the AnyRes families,
    a new `image_newline`) and its processor, whose chat template renders `template`'s inference prompt (the LLM
    tokenizer's own for `chat_template`) and whose image processor lays images out as `layout`
    (`prepare.image_aspect_ratio`; `pad`: padded to a square). Both default to the family's own.

    The paths are local directories, hub ids or storage URIs (`s3://`, mirrored to this process's own disk). Weights
    load in `dtype`, straight onto `device` when given; under an active ZeRO-3 config (training) every part loads
    partitioned across the ranks instead."""
    fam = family(name)
    template, layout = template or fam.template, layout or fam.image_layout
    vision_path, llm_path = storage.local_copy(vision_path), storage.local_copy(llm_path)
    processor = base_processor(fam, vision_path, llm_path, template, layout)
    tokenizer = processor.tokenizer
    placement = {"device_map": {"": device}} if device is not None else {}
    attention = attention_by_part(attn_implementation)
    vision = load_vision_tower(fam, vision_path, dtype, attention["vision_config"], placement)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, attn_implementation=attention["text_config"],
                                               **placement)
    padded_vocab = pad_embeddings(llm, len(tokenizer))

    config = model_config(fam, vision.config, llm.config, tokenizer, layout)
    # Build the shell on the meta device, uninitialised, then move the loaded parts in: no second copy of a 7B LLM.
    with torch.device("meta"), no_init_weights(), zero3_paused():
        model = fam.model_class(config)
    projector_class = type(model.model.multi_modal_projector)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector = new_projector(config, dtype, device, projector_class)
    if fam.takes_image_sizes():
        model.model.image_newline = new_image_newline(llm.config.hidden_size, dtype, device)
    model.config.text_config = llm.config
    model.set_attn_implementation(attention)
    set_generation_defaults(model, tokenizer, padded_vocab)
    return model, processor


# Attentions that read a packed row's sequence boundaries from keyword arguments (`train/engine.py` flatten_packed).
VARLEN_ATTENTIONS = ("flash_attention_2",)


def attention_by_part(attn_implementation: str) -> dict[str, str]:
    """Each part's attention (transformers' per-sub-config form): `attn_implementation` throughout, except that the
    vision tower takes SDPA where the LLM takes flash attention. The LLaVA classes pass the model's keyword arguments
    to the tower as well as to the LLM, a packed micro-batch's `cu_seq_lens_*` among them, and the tower's flash
    attention would read those as its own sequences' boundaries and attend across images. The tower's attention is
    unmasked and of fixed length: torch's SDPA runs a flash kernel for it anyway on A100s and later."""
    tower = "sdpa" if attn_implementation in VARLEN_ATTENTIONS else attn_implementation
    return {"": attn_implementation, "text_config": attn_implementation, "vision_config": tower}


TOWER_CLASSES = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}


def load_vision_tower(fam: Family, vision_path: str, dtype: torch.dtype, attn_implementation: str, placement: dict):
    """The vision half of a full CLIP / SigLIP repo; for OneVision without its last layer and its pooling head,
    which LLaVA never runs (their weights are left unread)."""
    tower_config = vision_config(vision_path)
    tower_class = TOWER_CLASSES[tower_config.model_type]
    return tower_class.from_pretrained(vision_path, dtype=dtype, attn_implementation=attn_implementation,
                                       **tower_cut(fam, tower_config), **placement)


def model_config(fam: Family, tower_config, text_config, tokenizer, layout: str):
    """The family's config class, as transformers' conversion scripts fill it: the media token ids, the tower's
    feature layer and selection, and the tile grids and feature budget of the AnyRes families."""
    media = {"image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
    if VIDEO_TOKEN in fam.media_tokens:
        media["video_token_index"] = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    budget = {"vision_aspect_ratio": vision_aspect_ratio(layout)} if fam.image_layout.startswith("anyres_max") else \
        {"image_seq_length": features_per_view(tower_config)}
    grids = {"image_grid_pinpoints": fam.pinpoints(tower_config.image_size, layout)} if fam.grids else {}
    config = fam.config_class(
        vision_config=tower_config, text_config=text_config, **media, **budget, **grids,
        projector_hidden_act="gelu",
        vision_feature_layer=fam.vision_feature_layer,
        vision_feature_select_strategy=feature_select_strategy(tower_config),
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


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


def new_image_newline(hidden_size: int, dtype: torch.dtype, device: torch.device | None) -> torch.nn.Parameter:
    """The learned embedding that ends each row of tile features, initialised as transformers does (std
    1/sqrt(hidden)). Under ZeRO-3 it is made whole on every rank and the engine converts it when it wraps the model
    (DeepSpeedZeRoOffload._convert_to_zero_parameters broadcasts rank 0's copy, then partitions it); no test runs
    that path yet."""
    return torch.nn.Parameter(torch.randn(hidden_size, dtype=dtype, device=device) / hidden_size ** 0.5)


def new_projector(config, dtype: torch.dtype, device: torch.device | None, projector_class: type):
    """A freshly initialised projector of the family's class (LLaVA-1.5's Linear, GELU, Linear): partitioned under
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

    path = storage.local_copy(path)
    model_type = AutoConfig.from_pretrained(path).model_type
    placement = {"device_map": {"": device}} if device is not None else {}
    model = model_class_of(path, model_type).from_pretrained(
        path, dtype=dtype, attn_implementation=attention_by_part(attn_implementation), **placement)
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
