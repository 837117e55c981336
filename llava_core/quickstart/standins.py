"""Tiny random-weight stand-ins of the base models the shipped workflows name, in their hub repos' file layouts.

Nothing can be downloaded here, so the quickstart and the tests write these and then load them exactly as a cluster
loads the real repos: the same config classes, weight file formats, tokenizer files and processor config. Only the
sizes are tiny. What each stand-in copies (file lists checked against the hub repos):

- `openai/clip-vit-large-patch14-336` (`save_clip`): a full `CLIPModel` (text and vision towers; `config.json` is a
  `CLIPConfig` with `text_config` / `vision_config`, so it has no top-level `image_size`), its weights as one
  `pytorch_model.bin`, and the repo's legacy `preprocessor_config.json` (integer `size` / `crop_size`,
  `feature_extractor_type: CLIPFeatureExtractor`, CLIP's mean/std, bicubic resample). Left out: the text tower's
  tokenizer files (vocab.json, merges.txt, tokenizer*.json) and tf_model.h5, which LLaVA never reads.
- `lmsys/vicuna-7b-v1.5` / `-13b-v1.5` (`save_vicuna`): `LlamaForCausalLM` whose `config.json` says float16 and
  `pad_token_id: 0`, weights (float16) in sharded `pytorch_model-0000N-of-0000M.bin` (2 shards for 7B, 3 for 13B)
  with `pytorch_model.bin.index.json`, `generation_config.json`, a sentencepiece `tokenizer.model` and no
  `tokenizer.json` (transformers converts it, which needs the `sentencepiece` package), `tokenizer_config.json`
  (`LlamaTokenizer`, `add_bos_token: true`, `add_eos_token: false`, `legacy: false`, no pad token) and
  `special_tokens_map.json`. The tokenizer is trained on the given corpus with LLaMA's trainer settings: BPE, byte
  fallback, digits split, `▁` as the space (a dummy prefix), identity normalisation, whitespace kept.

The quickstarts also give the vision tower (CLIP, or SigLIP for LLaVA-OneVision) a short pretraining of its own
(`pretrain_vision_tower`), because LLaVA starts from a trained tower, never a random one.
"""
from __future__ import annotations

import io
import json
import os
import string
import time
from typing import Callable, Iterator, Optional

import torch
from torch.nn.functional import cross_entropy
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from llava_core.model.chat_template import VICUNA_SYSTEM
from llava_core.schema import TinyModelSettings, section

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TRANSFORMERS_VERSION_OF_THE_REPOS = "4.31.0"  # what the Vicuna v1.5 repos' configs record
VERSION = 3  # of what these functions write: part of the quickstart's settings hash, so old copies are replaced


@section
class TinyModelConfig(TinyModelSettings):
    """The workflow's `synthetic.tiny_model` sizes (one definition, in the schema) and what a workflow does not set.
    `tower_pretraining_steps` is only read when save_tiny_models is given a batch source."""
    max_positions: int = 4096  # the LLM's context, as vicuna-7b-v1.5's config has it (rotary: no weights to size)
    position_embedding_std: float = 0.3
    seed: int = 0


# The stand-in LLMs' MLP width per unit of hidden size where a workflow sets none (`llm_intermediate: 0`): the hub
# models' ratios rounded down, Vicuna-7B's 11008 / 4096 (2.7) and Qwen2-7B's 18944 / 3584 (5.3).
VICUNA_MLP_RATIO, QWEN2_MLP_RATIO = 2, 5


def mlp_width(cfg: TinyModelConfig, hub_ratio: int) -> int:
    """The stand-in LLM's MLP width: the workflow's `llm_intermediate`, else `hub_ratio` times the hidden size."""
    return cfg.llm_intermediate or cfg.llm_hidden * hub_ratio


# --- openai/clip-vit-large-patch14-336 --------------------------------------------------------------------------


def clip_config(cfg: TinyModelConfig) -> CLIPConfig:
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=64, max_position_embeddings=16, bos_token_id=62, eos_token_id=63, pad_token_id=1,
                          projection_dim=cfg.vision_hidden)
    vision = CLIPVisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_hidden,
                              intermediate_size=cfg.vision_hidden * 4, num_hidden_layers=cfg.vision_layers,
                              num_attention_heads=4, projection_dim=cfg.vision_hidden)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.vision_hidden)


def vision_tower(cfg: TinyModelConfig) -> CLIPVisionModel:
    """The vision half of a tiny CLIP, as LLaVA uses it."""
    model = CLIPVisionModel(clip_config(cfg).vision_config)
    # A trained CLIP's patch features say where they are; random ones barely do (position embeddings start ~15x
    # weaker than patch content). Give the random stand-in position embeddings as strong as its content so
    # questions about position are answerable at all, as they are with the real tower.
    with torch.no_grad():
        model.embeddings.position_embedding.weight.normal_(0.0, cfg.position_embedding_std)
    return model


def legacy_preprocessor_config(image_size: int) -> dict:
    """The CLIP repo's own preprocessor_config.json (written before image processors existed), at `image_size`."""
    return {"crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "resample": 3, "size": image_size}


def tiny_image_processor(cfg: TinyModelConfig):
    """The image processor transformers builds from the stand-in's legacy preprocessor_config.json."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**{k: v for k, v in legacy_preprocessor_config(cfg.image_size).items()
                                    if k != "feature_extractor_type"})


def save_clip(path: str, cfg: TinyModelConfig, pretrain: Optional[Callable[[CLIPVisionModel], None]] = None) -> None:
    """A tiny `openai/clip-vit-large-patch14-336`: full CLIPModel, pytorch_model.bin, legacy preprocessor config."""
    tower = vision_tower(cfg)
    if pretrain is not None:
        pretrain(tower)
    clip = CLIPModel(clip_config(cfg))
    clip.vision_model.load_state_dict(tower.state_dict())
    clip.config.architectures = ["CLIPModel"]
    os.makedirs(path, exist_ok=True)
    clip.config.save_pretrained(path)
    torch.save(clip.state_dict(), os.path.join(path, "pytorch_model.bin"))
    _write_json(os.path.join(path, "preprocessor_config.json"), legacy_preprocessor_config(cfg.image_size))


# --- lmsys/vicuna-7b-v1.5 and -13b-v1.5 ------------------------------------------------------------------------


def train_llama_tokenizer(corpus: list[str], vocab_size: int) -> bytes:
    """A sentencepiece model trained the way LLaMA's was (byte fallback, split digits, `▁` for spaces), as bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    # Every printable ASCII character is a piece of its own, as in LLaMA's vocabulary (digits above all). The
    # template's words are in every training row (and common in LLaMA's web-scale data): weighted like that, they
    # become whole pieces instead of being spelled out letter by letter (71 tokens for the system prompt, not 29).
    alphabet = " ".join(string.ascii_letters + string.digits + string.punctuation)
    template = [VICUNA_SYSTEM + " USER: ASSISTANT:"] * max(1, len(corpus) // 16)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus + template + [alphabet]), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2)
    return model.getvalue()


def _special(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def _added_token(content: str) -> dict:
    """A special token as tokenizer_config.json's `added_tokens_decoder` has written them since transformers 4.34."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


VICUNA_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": _special("<s>"), "clean_up_tokenization_spaces": False,
    "eos_token": _special("</s>"), "legacy": False, "model_max_length": 4096, "pad_token": None,
    "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": _special("<unk>"),
}
VICUNA_SPECIAL_TOKENS_MAP = {"bos_token": _special("<s>"), "eos_token": _special("</s>"),
                             "unk_token": _special("<unk>")}


def llama_config(cfg: TinyModelConfig, vocab_size: int) -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.llm_hidden, intermediate_size=mlp_width(cfg, VICUNA_MLP_RATIO),
        num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads, num_key_value_heads=cfg.llm_heads,
        max_position_embeddings=cfg.max_positions, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float16"
    return config


def save_vicuna(path: str, corpus: list[str], cfg: TinyModelConfig, shards: int = 2) -> None:
    """A tiny `lmsys/vicuna-*-v1.5`: LlamaForCausalLM in `shards` pytorch_model-*.bin files with their index, and a
    sentencepiece tokenizer.model with the repo's tokenizer_config.json (no tokenizer.json)."""
    import sentencepiece as spm

    os.makedirs(path, exist_ok=True)
    tokenizer_model = train_llama_tokenizer(corpus, cfg.vocab_size)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(tokenizer_model)
    vocab_size = spm.SentencePieceProcessor(model_proto=tokenizer_model).get_piece_size()
    model = LlamaForCausalLM(llama_config(cfg, vocab_size))
    model.config.save_pretrained(path)
    _write_json(os.path.join(path, "generation_config.json"), {
        "bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
        "temperature": 0.9, "top_p": 0.6, "transformers_version": TRANSFORMERS_VERSION_OF_THE_REPOS})
    save_sharded_bin(path, {k: v.half() for k, v in model.state_dict().items()}, shards)
    _write_json(os.path.join(path, "tokenizer_config.json"), VICUNA_TOKENIZER_CONFIG)
    _write_json(os.path.join(path, "special_tokens_map.json"), VICUNA_SPECIAL_TOKENS_MAP)


def save_sharded_bin(path: str, state: dict, shards: int) -> None:
    """Weights as `pytorch_model-0000N-of-0000M.bin` plus `pytorch_model.bin.index.json`, as the Vicuna repos ship."""
    save_shards(path, state, shards, "pytorch_model", "bin", lambda part, file: torch.save(part, file))


def save_shards(path: str, state: dict, shards: int, stem: str, extension: str, write) -> None:
    """`state` split in `shards` files `<stem>-0000N-of-0000M.<extension>` (each written by `write(part, file)`), and
    the `<stem>.<extension>.index.json` weight map that transformers reads to find each tensor."""
    keys = list(state)
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    for n in range(shards):
        name = f"{stem}-{n + 1:05d}-of-{shards:05d}.{extension}"
        part = {k: state[k] for k in keys[n * per_shard:(n + 1) * per_shard]}
        write(part, os.path.join(path, name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(os.path.join(path, f"{stem}.{extension}.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


# --- a byte-level BPE tokenizer (the kind Qwen2 and LLaMA-3 ship) ----------------------------------------------


def byte_level_bpe_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `corpus` with LLaMA's special tokens and a BOS in front of every
    sequence: the other tokenizer family the templates must handle (spaces merge into the next word, `Ġ4`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus + [VICUNA_SYSTEM, "USER: ASSISTANT:"], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=2048)


# --- google/siglip-so400m-patch14-384 (LLaVA-OneVision's vision tower) -----------------------------------------
#
# The repo as transformers' convert_siglip_to_hf.py saved it (transformers 4.37.0.dev0): a full `SiglipModel`.
# Keys of its config.json and preprocessor_config.json as copies of the repo's files in public code show them (a
# llama.cpp SigLIP-encoder recipe's config.json; FramePack's / LLaVA-style SigLIP preprocessor configs, several
# independent copies agreeing); the file list (config.json, model.safetensors, preprocessor_config.json,
# special_tokens_map.json, spiece.model, tokenizer_config.json) from a mirror script of the repo that downloads each
# file. That mirror also lists a tokenizer.json, which transformers' SiglipTokenizer (sentencepiece only) never
# reads: the stand-in leaves it out, as the CLIP stand-in leaves out its text tokenizer.

SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
SIGLIP_REPO_TRANSFORMERS_VERSION = "4.37.0.dev0"


def siglip_config_json(cfg: TinyModelConfig, text_vocab_size: int) -> dict:
    """The real config.json's keys at tiny sizes; everything it leaves out stays a SiglipConfig default as in the
    real repo (gelu_pytorch_tanh, layer_norm_eps 1e-6, 64 text positions, the vision pooling head). Text and vision
    widths are equal, as SigLIP's image-text similarity needs; the text tower also names its vocabulary size, which
    the real file leaves at the default 32000."""
    widths = {"hidden_size": cfg.vision_hidden, "intermediate_size": cfg.vision_hidden * 4, "num_attention_heads": 4}
    return {
        "architectures": ["SiglipModel"], "initializer_factor": 1.0, "model_type": "siglip",
        "text_config": {**widths, "model_type": "siglip_text_model", "num_hidden_layers": 1,
                        "vocab_size": text_vocab_size},
        "torch_dtype": "float32", "transformers_version": SIGLIP_REPO_TRANSFORMERS_VERSION,
        "vision_config": {**widths, "image_size": cfg.image_size, "model_type": "siglip_vision_model",
                          "num_hidden_layers": cfg.vision_layers, "patch_size": cfg.patch_size},
    }


def siglip_preprocessor_config(image_size: int) -> dict:
    """The repo's preprocessor_config.json: a square bicubic resize (no crop) and mean = std = 0.5."""
    return {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": SIGLIP_MEAN,
            "image_processor_type": "SiglipImageProcessor", "image_std": SIGLIP_STD,
            "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size}}


def train_siglip_tokenizer(corpus: list[str], vocab_size: int) -> bytes:
    """A unigram sentencepiece model laid out like T5's (`<pad>` 0, `</s>` 1, `<unk>` 2), the family SigLIP's
    English vocabulary comes from. LLaVA never reads it; it is here so the repo loads as a whole."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, character_coverage=1.0, minloglevel=2)
    return model.getvalue()


SIGLIP_TOKENIZER_CONFIG = {  # as transformers 4.37's SiglipTokenizer wrote it when the repo was converted
    "added_tokens_decoder": {"1": _added_token("</s>"), "2": _added_token("<unk>")},
    "additional_special_tokens": [], "clean_up_tokenization_spaces": True, "do_lower_case": True,
    "eos_token": "</s>", "model_input_names": ["input_ids"], "model_max_length": 64, "pad_token": "</s>",
    "processor_class": "SiglipProcessor", "sp_model_kwargs": {}, "tokenizer_class": "SiglipTokenizer",
    "unk_token": "<unk>",
}
SIGLIP_SPECIAL_TOKENS_MAP = {name: {k: v for k, v in _added_token(token).items() if k != "special"}
                             for name, token in (("eos_token", "</s>"), ("pad_token", "</s>"), ("unk_token", "<unk>"))}


def tiny_siglip_image_processor(cfg: TinyModelConfig):
    """The image processor transformers builds from the SigLIP stand-in's preprocessor_config.json."""
    from transformers import SiglipImageProcessorPil

    settings = siglip_preprocessor_config(cfg.image_size)
    return SiglipImageProcessorPil(**{k: v for k, v in settings.items()
                                      if k not in ("image_processor_type", "processor_class")})


def save_siglip(path: str, corpus: list[str], cfg: TinyModelConfig,
                pretrain: Optional[Callable[[torch.nn.Module], None]] = None) -> None:
    """A tiny `google/siglip-so400m-patch14-384`: a full SiglipModel (text and vision towers, the vision tower with
    its pooling head) in one float32 model.safetensors, the repo's configs and a sentencepiece spiece.model. The
    vision tower is pretrained first by `pretrain` where given (as `save_clip`'s)."""
    import sentencepiece as spm
    from safetensors.torch import save_file
    from transformers import SiglipConfig, SiglipModel

    os.makedirs(path, exist_ok=True)
    tokenizer_model = train_siglip_tokenizer(corpus, vocab_size=64)
    with open(os.path.join(path, "spiece.model"), "wb") as f:
        f.write(tokenizer_model)
    config = siglip_config_json(cfg, spm.SentencePieceProcessor(model_proto=tokenizer_model).get_piece_size())
    model = SiglipModel(SiglipConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    if pretrain is not None:  # SiglipModel's vision half is itself a SiglipVisionModel, what LLaVA loads
        with torch.no_grad():  # as vision_tower() does for CLIP: positions as strong as patch content
            model.vision_model.embeddings.position_embedding.weight.normal_(0.0, cfg.position_embedding_std)
        pretrain(model.vision_model)
    _write_json(os.path.join(path, "config.json"), config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(os.path.join(path, "preprocessor_config.json"), siglip_preprocessor_config(cfg.image_size))
    _write_json(os.path.join(path, "tokenizer_config.json"), SIGLIP_TOKENIZER_CONFIG)
    _write_json(os.path.join(path, "special_tokens_map.json"), SIGLIP_SPECIAL_TOKENS_MAP)


# --- Qwen/Qwen2-7B-Instruct (LLaVA-OneVision's LLM) --------------------------------------------------------------
#
# Qwen2ForCausalLM in 4 bfloat16 shards `model-0000N-of-00004.safetensors` with model.safetensors.index.json,
# generation_config.json, and a byte-level BPE tokenizer as tokenizer.json + vocab.json + merges.txt with
# tokenizer_config.json (`Qwen2Tokenizer`, ChatML template, no BOS, eos `<|im_end|>`, pad `<|endoftext|>`) and no
# special_tokens_map.json: the file list a FireRedASR2 download check requires of its vendored copy of the repo.
# Config values from the repo's config.json as printed in public code (Qwen2Config of "Qwen/Qwen2-7B-Instruct":
# 3584 wide, 28 layers, 28 heads, 4 KV heads, 18944 MLP, 152064 embedding rows, rope theta 1e6, untied lm_head,
# bos 151643, eos 151645); generation settings as Qwen2-Instruct inference configs copy them.

QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # 151643, 151644, 151645: after the BPE vocab
QWEN2_REPO_TRANSFORMERS_VERSION = "4.41.2"
QWEN2_SHARDS = 4
# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.py rebuilds it from this same pattern when it loads).
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_qwen2_tokenizer(corpus: list[str], vocab_size: int):
    """Qwen2's tokenizer pipeline (NFC, its regex split, byte-level BPE, no BOS) trained on `corpus`, with its three
    special tokens appended after the learned vocabulary as in the real one."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from llava_core.model.chat_template import QWEN2_SYSTEM

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # The template's words are in every row, as they are common in Qwen2's own data; one a line, as the template
    # writes them after `<|im_start|>` (" user" with its space is another pre-token: "user" stayed 2 tokens and
    # "assistant" 3, ~15 a 5-turn row, where the real tokenizer has one each).
    template_words = "\n".join(["system", "user", "assistant", QWEN2_SYSTEM])
    tokenizer.train_from_iterator(corpus + [template_words] * max(1, len(corpus) // 16), trainer=trainer)
    tokenizer.add_special_tokens(list(QWEN2_SPECIAL_TOKENS))
    return tokenizer


def qwen2_tokenizer_config(first_special_id: int) -> dict:
    from llava_core.model.chat_template import QWEN2_CHAT_TEMPLATE

    decoder = {str(first_special_id + n): _added_token(t) for n, t in enumerate(QWEN2_SPECIAL_TOKENS)}
    return {"add_prefix_space": False, "added_tokens_decoder": decoder,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
            "chat_template": QWEN2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
            "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
            "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}


def qwen2_embedding_rows(tokens: int) -> int:
    """Qwen2-7B has 152,064 embedding rows for 151,646 tokens: spare rows that LLaVA-OneVision's `<image>` and
    `<video>` (151646, 151647) fill without a resize. The stand-in keeps spare rows the same way."""
    return -(-(tokens + 2) // 128) * 128


def qwen2_config_json(cfg: TinyModelConfig, tokens: int, first_special_id: int) -> dict:
    heads = cfg.llm_heads
    return {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": first_special_id,
        "eos_token_id": first_special_id + 2, "hidden_act": "silu", "hidden_size": cfg.llm_hidden,
        "initializer_range": 0.02, "intermediate_size": mlp_width(cfg, QWEN2_MLP_RATIO),
        "max_position_embeddings": 32768,
        "max_window_layers": cfg.llm_layers, "model_type": "qwen2", "num_attention_heads": heads,
        "num_hidden_layers": cfg.llm_layers, "num_key_value_heads": max(1, heads // 2), "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": QWEN2_REPO_TRANSFORMERS_VERSION, "use_cache": True, "use_sliding_window": False,
        "vocab_size": qwen2_embedding_rows(tokens)}


def save_qwen2(path: str, corpus: list[str], cfg: TinyModelConfig, shards: int = QWEN2_SHARDS) -> None:
    """A tiny `Qwen/Qwen2-7B-Instruct` (grouped-query attention with biased q/k/v as the real one; KV heads half the
    heads where the real model has 4 of 28): files, config keys and tokenizer as the repo ships them."""
    from transformers import AutoConfig, Qwen2ForCausalLM

    os.makedirs(path, exist_ok=True)
    tokenizer = train_qwen2_tokenizer(corpus, cfg.vocab_size)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    tokenizer.model.save(path)  # vocab.json + merges.txt
    first_special = tokenizer.token_to_id(QWEN2_SPECIAL_TOKENS[0])
    _write_json(os.path.join(path, "tokenizer_config.json"), qwen2_tokenizer_config(first_special))
    _write_json(os.path.join(path, "config.json"), qwen2_config_json(cfg, tokenizer.get_vocab_size(), first_special))
    _write_json(os.path.join(path, "generation_config.json"), {
        "bos_token_id": first_special, "do_sample": True, "eos_token_id": [first_special + 2, first_special],
        "pad_token_id": first_special, "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
        "transformers_version": "4.37.0"})
    model = Qwen2ForCausalLM(AutoConfig.from_pretrained(path))
    save_sharded_safetensors(path, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, shards)


def save_sharded_safetensors(path: str, state: dict, shards: int) -> None:
    """Weights as `model-0000N-of-0000M.safetensors` plus `model.safetensors.index.json`, as the Qwen2 repos ship."""
    from safetensors.torch import save_file

    save_shards(path, state, shards, "model", "safetensors",
                lambda part, file: save_file({k: t.contiguous() for k, t in part.items()}, file,
                                             metadata={"format": "pt"}))


# --- every base model a shipped workflow names -----------------------------------------------------------------

SHARDS = {"lmsys/vicuna-7b-v1.5": 2, "lmsys/vicuna-13b-v1.5": 3}
STANDINS = {
    "openai/clip-vit-large-patch14-336": lambda path, corpus, cfg: save_clip(path, cfg),
    "google/siglip-so400m-patch14-384": save_siglip,
    **{vicuna: (lambda path, corpus, cfg, shards=shards: save_vicuna(path, corpus, cfg, shards))
       for vicuna, shards in SHARDS.items()},
    "Qwen/Qwen2-7B-Instruct": save_qwen2,
}


def save_standin(hub_id: str, path: str, corpus: list[str], cfg: TinyModelConfig) -> None:
    """Write the tiny stand-in of `hub_id` (a vision tower or an LLM a shipped workflow names) to `path`."""
    if hub_id not in STANDINS:
        raise KeyError(f"no stand-in for {hub_id!r}; known: {list(STANDINS)}")
    STANDINS[hub_id](path, corpus, cfg)


# The vision towers whose stand-ins can be pretrained: (path, corpus, cfg, pretrain or None).
PRETRAINABLE_TOWERS = {
    "openai/clip-vit-large-patch14-336": lambda path, corpus, cfg, pretrain: save_clip(path, cfg, pretrain),
    "google/siglip-so400m-patch14-384": save_siglip,
}


def save_tiny_models(vision_path: str, llm_path: str, corpus: list[str], cfg: TinyModelConfig,
                     tower_pretraining: Optional[TowerPretraining] = None,
                     vision_hub_id: str = "openai/clip-vit-large-patch14-336",
                     llm_hub_id: str = "lmsys/vicuna-7b-v1.5") -> None:
    """A quickstart's base models: the stand-in of `vision_hub_id` (CLIP ViT-L/14-336 or SigLIP so400m; pretrained
    first when `tower_pretraining` data is given) at `vision_path` and of `llm_hub_id` (Vicuna-7B v1.5 or
    Qwen2-7B-Instruct) with a tokenizer trained on `corpus` at `llm_path`."""
    torch.manual_seed(cfg.seed)
    pretrain = None
    if tower_pretraining and cfg.tower_pretraining_steps > 0:
        batches, classes, weights = tower_pretraining

        def pretrain(tower):
            pretrain_vision_tower(tower, batches, classes, cfg.tower_pretraining_steps, weights=weights)
    PRETRAINABLE_TOWERS[vision_hub_id](vision_path, corpus, cfg, pretrain)
    save_standin(llm_hub_id, llm_path, corpus, cfg)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# --- the quickstart tower's own pretraining --------------------------------------------------------------------

# (batches of (pixel_values (B, 3, H, W), per-patch class ids (B, patches, kinds)), classes per label kind,
#  each kind's weight in the loss or None for 1 each)
TowerPretraining = tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], tuple, Optional[tuple]]


def pretrain_vision_tower(model, batches, classes: tuple, steps: int, lr: float = 3e-3,
                          weights: Optional[tuple] = None) -> list[float]:
    """Teach the layer LLaVA reads (hidden state -2: CLIP's patch tokens without CLS; for SigLIP, which has no CLS,
    every token, the last layer of the cut tower OneVision keeps) to say what lies under each patch, one linear head
    per label kind; the heads are thrown away after. Labels of -100 (a kind a view cannot show) are not trained.
    This stands in for CLIP's / SigLIP's pretraining: a trained tower's patch tokens already carry the object they
    belong to, which a random tower's do not (they carry only the local pixels, and a tiny LLM trained for minutes
    cannot learn to bind colour, shape and place across them). `weights`: each kind's factor in the summed loss
    (None: 1 each). Returns the last batch's accuracy per label kind, on the patches where a thing of that kind
    lies (an easy kind would hide a hard one in one pooled figure)."""
    from llava_core.model.families import tower_has_cls

    first_patch = int(tower_has_cls(model.config))
    heads = torch.nn.ModuleList(torch.nn.Linear(model.config.hidden_size, n) for n in classes)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    start, accuracy = time.time(), []
    for step in range(1, steps + 1):
        pixels, labels = next(batches)
        features = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, first_patch:]
        logits = [head(features) for head in heads]
        losses = [cross_entropy(kind.flatten(0, 1), labels[..., k].flatten()) for k, kind in enumerate(logits)]
        loss = sum(losses if weights is None else [w * term for w, term in zip(weights, losses)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            accuracy = _foreground_accuracy(logits, labels)
            print(f"[vision tower] step {step}/{steps} loss {loss.item():.4f} patch accuracy by label kind "
                  f"{' '.join(f'{a:.2f}' for a in accuracy)} (this batch) {time.time() - start:.0f}s", flush=True)
    model.eval()
    return accuracy


def _foreground_accuracy(logits: list[torch.Tensor], labels: torch.Tensor) -> list[float]:
    """Each kind's accuracy over the patches where something of that kind lies (label > 0; nan where none does);
    chance is about 1 / the kind's classes, as background patches (the easy majority) are left out."""
    hits = [(kind.argmax(-1) == labels[..., k])[labels[..., k] > 0] for k, kind in enumerate(logits)]
    return [h.float().mean().item() if h.numel() else float("nan") for h in hits]
