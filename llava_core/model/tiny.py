"""Tiny stand-ins for `openai/clip-vit-large-patch14-336` and `lmsys/vicuna-7b-v1.5`, saved in Hugging Face format.

Nothing can be downloaded here, so the quickstart and the tests build these from configs (random weights), train a
byte-level BPE tokenizer on the dataset's own text, and save everything with `save_pretrained`. From then on the
project loads them exactly as it loads the real models. The quickstart also gives the vision tower a short
pretraining of its own (`pretrain_vision_tower`), because LLaVA starts from a trained CLIP, never a random one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.nn.functional import cross_entropy
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
    tower_pretraining_steps: int = 0  # only with a batch source given to save_tiny_models
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


def vision_tower(cfg: TinyModelConfig) -> CLIPVisionModel:
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
    # weaker than patch content). Give the random stand-in position embeddings as strong as its content so
    # questions about position are answerable at all, as they are with the real tower.
    with torch.no_grad():
        model.embeddings.position_embedding.weight.normal_(0.0, cfg.position_embedding_std)
    return model


def tiny_image_processor(cfg: TinyModelConfig) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size}
    )


# (batches of (pixel_values (B, 3, H, W), per-patch class ids (B, patches, kinds)), classes per label kind)
TowerPretraining = tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], tuple]


def save_tiny_vision_tower(path: str, cfg: TinyModelConfig, pretraining: Optional[TowerPretraining] = None) -> None:
    """Save a tiny CLIP vision tower and its processor, pretrained first when `pretraining` data is given."""
    model = vision_tower(cfg)
    if pretraining and cfg.tower_pretraining_steps > 0:
        batches, classes = pretraining
        pretrain_vision_tower(model, batches, classes, cfg.tower_pretraining_steps)
    model.save_pretrained(path)
    tiny_image_processor(cfg).save_pretrained(path)


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


def save_tiny_models(vision_path: str, llm_path: str, corpus: list[str], cfg: TinyModelConfig,
                     tower_pretraining: Optional[TowerPretraining] = None) -> None:
    """Write a tiny CLIP vision tower to `vision_path` and a tiny LLaMA with its tokenizer to `llm_path`."""
    torch.manual_seed(cfg.seed)
    save_tiny_vision_tower(vision_path, cfg, tower_pretraining)
    save_tiny_llm(llm_path, train_tokenizer(corpus, cfg.vocab_size), cfg)
