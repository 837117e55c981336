"""Tiny stand-ins for `openai/clip-vit-large-patch14-336` and `lmsys/vicuna-7b-v1.5`, saved in Hugging Face format.

Nothing can be downloaded here, so the quickstart and the tests build these from configs (random weights), train a
byte-level BPE tokenizer on the dataset's own text, and save everything with `save_pretrained`. From then on the
project loads them exactly as it loads the real models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

from llava_core.model.chat_template import VICUNA_SYSTEM

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # Vicuna's; build.py adds <image> and <pad> like the HF conversion does


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
    seed: int = 0


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus + [VICUNA_SYSTEM, "USER: ASSISTANT:"], trainer=trainer)
    # Like LLaMA's tokenizer: a BOS token in front of every sequence, no EOS (templates write </s> themselves).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048
    )


def save_tiny_vision_tower(path: str, cfg: TinyModelConfig) -> None:
    config = CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 4,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=4,
        projection_dim=cfg.vision_hidden,
    )
    model = CLIPVisionModel(config)
    # A trained CLIP's patch features say where they are; random ones barely do (position embeddings start ~15x
    # weaker than patch content). Give the frozen random stand-in position embeddings as strong as its content so
    # questions about position are answerable at all, as they are with the real tower.
    with torch.no_grad():
        model.embeddings.position_embedding.weight.normal_(0.0, cfg.position_embedding_std)
    model.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size}
    ).save_pretrained(path)


def save_tiny_llm(path: str, tokenizer: PreTrainedTokenizerFast, cfg: TinyModelConfig) -> None:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.llm_hidden,
        intermediate_size=cfg.llm_hidden * 2,
        num_hidden_layers=cfg.llm_layers,
        num_attention_heads=cfg.llm_heads,
        num_key_value_heads=cfg.llm_heads,
        max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def save_tiny_models(vision_path: str, llm_path: str, corpus: list[str], cfg: TinyModelConfig) -> None:
    """Write a tiny CLIP vision tower to `vision_path` and a tiny LLaMA with its tokenizer to `llm_path`."""
    torch.manual_seed(cfg.seed)
    save_tiny_vision_tower(vision_path, cfg)
    save_tiny_llm(llm_path, train_tokenizer(corpus, cfg.vocab_size), cfg)
