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

The quickstart also gives the vision tower a short pretraining of its own (`pretrain_vision_tower`), because LLaVA
starts from a trained CLIP, never a random one.
"""
from __future__ import annotations

import io
import json
import os
import string
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch.nn.functional import cross_entropy
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel, LlamaConfig
from transformers import LlamaForCausalLM

from llava_core.model.chat_template import VICUNA_SYSTEM

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TRANSFORMERS_VERSION_OF_THE_REPOS = "4.31.0"  # what the Vicuna v1.5 repos' configs record
VERSION = 2  # of what these functions write: part of the quickstart's settings hash, so old copies are replaced


@dataclass
class TinyModelConfig:
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 3
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    vocab_size: int = 600
    max_positions: int = 1024
    position_embedding_std: float = 0.3
    tower_pretraining_steps: int = 0  # only with a batch source given to save_tiny_models
    seed: int = 0


# --- openai/clip-vit-large-patch14-336 --------------------------------------------------------------------------


def clip_config(cfg: TinyModelConfig) -> CLIPConfig:
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=64, max_position_embeddings=16, bos_token_id=62, eos_token_id=63, pad_token_id=1, projection_dim=cfg.vision_hidden)
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


VICUNA_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": _special("<s>"), "clean_up_tokenization_spaces": False,
    "eos_token": _special("</s>"), "legacy": False, "model_max_length": 4096, "pad_token": None,
    "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": _special("<unk>"),
}
VICUNA_SPECIAL_TOKENS_MAP = {"bos_token": _special("<s>"), "eos_token": _special("</s>"), "unk_token": _special("<unk>")}


def llama_config(cfg: TinyModelConfig, vocab_size: int) -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_hidden * 2,
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
    keys = list(state)
    per_shard = -(-len(keys) // shards)
    weight_map = {}
    for n in range(shards):
        name = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[n * per_shard:(n + 1) * per_shard]}
        torch.save(part, os.path.join(path, name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(os.path.join(path, "pytorch_model.bin.index.json"),
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


# --- every base model a shipped workflow names -----------------------------------------------------------------

SHARDS = {"lmsys/vicuna-7b-v1.5": 2, "lmsys/vicuna-13b-v1.5": 3}
VISION_TOWERS = ("openai/clip-vit-large-patch14-336",)


def save_standin(hub_id: str, path: str, corpus: list[str], cfg: TinyModelConfig) -> None:
    """Write the tiny stand-in of `hub_id` (a vision tower or an LLM a shipped workflow names) to `path`."""
    if hub_id in VISION_TOWERS:
        save_clip(path, cfg)
    elif hub_id in SHARDS:
        save_vicuna(path, corpus, cfg, SHARDS[hub_id])
    else:
        raise KeyError(f"no stand-in for {hub_id!r}; known: {[*VISION_TOWERS, *SHARDS]}")


def save_tiny_models(vision_path: str, llm_path: str, corpus: list[str], cfg: TinyModelConfig,
                     tower_pretraining: Optional["TowerPretraining"] = None) -> None:
    """The quickstart's base models: stand-ins of CLIP ViT-L/14-336 (pretrained first when `tower_pretraining` data
    is given) at `vision_path` and of Vicuna-7B v1.5 with a tokenizer trained on `corpus` at `llm_path`."""
    torch.manual_seed(cfg.seed)
    pretrain = None
    if tower_pretraining and cfg.tower_pretraining_steps > 0:
        batches, classes = tower_pretraining

        def pretrain(tower):
            pretrain_vision_tower(tower, batches, classes, cfg.tower_pretraining_steps)
    save_clip(vision_path, cfg, pretrain)
    save_vicuna(llm_path, corpus, cfg, SHARDS["lmsys/vicuna-7b-v1.5"])


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# --- the quickstart tower's own pretraining --------------------------------------------------------------------

# (batches of (pixel_values (B, 3, H, W), per-patch class ids (B, patches, kinds)), classes per label kind)
TowerPretraining = tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], tuple]


def pretrain_vision_tower(model: CLIPVisionModel, batches, classes: tuple, steps: int, lr: float = 3e-3) -> float:
    """Teach the layer LLaVA reads (hidden state -2) to say what lies under each patch, one linear head per label
    kind; the heads are thrown away after. This stands in for CLIP's pretraining: a trained CLIP's patch tokens
    already carry the object they belong to, which a random tower's do not (they carry only the local pixels, and a
    tiny LLM trained for minutes cannot learn to bind colour, shape and place across them). Returns the final
    per-patch accuracy of the foreground patches."""
    heads = torch.nn.ModuleList(torch.nn.Linear(model.config.hidden_size, n) for n in classes)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    start, accuracy = time.time(), 0.0
    for step in range(1, steps + 1):
        pixels, labels = next(batches)
        features = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        logits = [head(features) for head in heads]
        loss = sum(cross_entropy(l.flatten(0, 1), labels[..., k].flatten()) for k, l in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            accuracy = _foreground_accuracy(logits, labels)
            print(f"[vision tower] step {step}/{steps} loss {loss.item():.4f} "
                  f"patch accuracy {accuracy:.3f} (this batch) {time.time() - start:.0f}s", flush=True)
    model.eval()
    return accuracy


def _foreground_accuracy(logits: list[torch.Tensor], labels: torch.Tensor) -> float:
    foreground = labels[..., 0] > 0
    hits = [(l.argmax(-1) == labels[..., k])[foreground] for k, l in enumerate(logits)]
    return torch.stack(hits).float().mean().item()
