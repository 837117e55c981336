"""LoRA on the LLM of a LLaVA model with peft: wrap it and save the adapter alone (train/save.py merges it into the
exported weights).

Adapters go on the LLM's Linear layers only (LLaVA-1.5: q,k,v,o,gate,up,down; r=128, alpha=256), never on the
projector, the vision tower or lm_head: the target regex is anchored on the language model's module path. The
adapter directory is peft's own (loads with `PeftModel.from_pretrained(base, dir)`), plus
`non_lora_trainables.safetensors` for fully trained parts such as the projector, as the official LLaVA code does.
"""
from __future__ import annotations

import os


def llava_of(model):
    """The LlavaForConditionalGeneration inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def lora_config(settings: dict):
    from peft import LoraConfig

    names = "|".join(settings["target_modules"])
    return LoraConfig(
        r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"], bias="none",
        # fullmatch on module names: the LLM lives under `model.language_model`; CLIP also has q_proj/k_proj/v_proj
        target_modules=rf".*\.language_model\..*\.({names})")


def apply_lora(model, settings: dict):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(settings))


def save_adapter(model, directory: str) -> list[str]:
    """peft's adapter files plus the fully trained non-LoRA parameters (e.g. the projector)."""
    from safetensors.torch import save_file

    model.save_pretrained(directory)
    extra = {name.replace("base_model.model.", "", 1): param.detach().contiguous().clone()
             for name, param in model.named_parameters() if param.requires_grad and "lora_" not in name}
    if extra:
        save_file(extra, os.path.join(directory, "non_lora_trainables.safetensors"))
    return sorted(os.listdir(directory))
