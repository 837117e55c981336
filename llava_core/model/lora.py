"""LoRA on the LLM of a LLaVA model with peft: wrap it and save the adapter alone (train/save.py merges it into the
exported weights).

Adapters go on the LLM's Linear layers only (LLaVA-1.5: q,k,v,o,gate,up,down; r=128, alpha=256), never on the
projector, the vision tower or lm_head: the target regex is anchored on the language model's module path. Parts
trained in full beside the adapters (the projector; the tower if the stage trains it) are peft's `modules_to_save`:
peft wraps each in a ModulesToSaveWrapper that trains a copy and keeps the original frozen aside, and saves the copy
in the adapter. The adapter directory is peft's own and complete: `PeftModel.from_pretrained(base, dir)` restores
the trained model (the official LLaVA code needs a `non_lora_trainables.bin` beside it instead).
"""
from __future__ import annotations

import os
import re

from llava_core.schema import LoraSettings


def llava_of(model):
    """The LlavaForConditionalGeneration inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def trained_module(module):
    """The module that runs: a modules_to_save wrapper's active copy (its `original_module` is the frozen one), or
    the module itself."""
    from peft.utils import ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        return module.modules_to_save[module.active_adapters[0]]
    return module


def is_kept_original(name: str) -> bool:
    """A parameter of the frozen original a modules_to_save wrapper keeps beside its trained copy: not part of the
    model that runs or is exported."""
    return ".original_module." in name


def plain_name(name: str) -> str:
    """A tensor's name in the plain (merged) model, from its name inside peft's wrappers."""
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name).replace(".base_layer.", ".")
    return name.removeprefix("base_model.model.")


def module_paths(model, modules: list) -> list[str]:
    """The paths of `modules` in `model`, as peft's `modules_to_save` names them (it matches name endings). peft
    wraps modules only: a bare parameter (LLaVA-NeXT's `image_newline`) cannot be saved in an adapter."""
    paths = {id(module): name for name, module in model.named_modules()}
    bare = [m for m in modules if id(m) not in paths]
    if bare:
        raise ValueError(f"{len(bare)} trained part(s) are not modules ({[tuple(m.shape) for m in bare]}): peft's "
                         "modules_to_save cannot save them in the adapter")
    return [paths[id(m)] for m in modules]


def lora_config(settings: LoraSettings, modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    names = "|".join(settings.target_modules)
    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
        # fullmatch on module names: the LLM lives under `model.language_model`; CLIP also has q_proj/k_proj/v_proj
        target_modules=rf".*\.language_model\..*\.({names})",
        modules_to_save=modules_to_save or None)


def apply_lora(model, settings: LoraSettings, full_modules: list | None = None):
    """LoRA on the LLM; `full_modules` (e.g. the projector) train in full and are saved in the adapter. The adapters
    take the model's dtype: peft's default upcasts them to fp32, and ZeRO-3 then refuses a bf16 model's parameter
    group that mixes fp32 adapters with the bf16 projector copy (DeepSpeed keeps fp32 master weights of every trained
    parameter anyway, so nothing is lost)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(settings, module_paths(model, full_modules or [])),
                          autocast_adapter_dtype=False)


def save_adapter(model, directory: str) -> list[str]:
    """peft's adapter directory: the LoRA weights and the fully trained modules_to_save (e.g. the projector)."""
    model.save_pretrained(directory)
    return sorted(os.listdir(directory))
