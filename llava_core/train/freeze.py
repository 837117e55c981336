"""Which parameters a stage trains: the stage names parts (and LoRA), this module applies it, builds the optimizer's
parameter groups and reports exactly what trains.

Parts of transformers' LLaVA models (every family): `vision` (the CLIP or SigLIP tower), `projector`, `llm` (decoder
and lm_head, and the AnyRes families' `image_newline`, which LLaVA-NeXT's training code counts with the language
model: `mm_language_model` unfreezes everything that is not tower or projector), plus `lora` when LoRA adapters
wrap the LLM's Linear layers (the LLM itself, `image_newline` included, then stays frozen). With LoRA the other
trained parts are peft's modules_to_save: their parameters train under `...modules_to_save.default...` names beside
a frozen `...original_module...` copy, which the reports leave out (it is not part of the model that runs).
"""
from __future__ import annotations

import torch

from llava_core.model.lora import apply_lora, is_kept_original, llava_of
from llava_core.schema import LoraSettings


def parts_of(model) -> dict:
    """The named parts of transformers' LlavaForConditionalGeneration."""
    model = llava_of(model)
    newline = [model.model.image_newline] if getattr(model.model, "image_newline", None) is not None else []
    return {
        "vision": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "llm": [model.model.language_model, model.lm_head, *newline],
    }


def parameters_of(module) -> list:
    """A part's parameters: a module's, or a bare parameter such as `image_newline`."""
    return [module] if isinstance(module, torch.nn.Parameter) else list(module.parameters())


def part_of(name: str) -> str:
    """The part a parameter belongs to, from its name (works inside a peft wrapper too)."""
    if "lora_" in name:
        return "lora"
    if "multi_modal_projector" in name:
        return "projector"
    if "vision_tower" in name:
        return "vision"
    return "llm"


def set_trainable(model, trainable: list[str]) -> dict[str, dict]:
    """Freeze everything but `trainable`; returns {part: {"trainable": bool, "parameters": n}} for the logs."""
    model.requires_grad_(False)
    report = {}
    for part, modules in parts_of(model).items():
        train = part in trainable
        count = 0
        for module in modules:
            module.requires_grad_(train)
            count += sum(p.numel() for p in parameters_of(module))
        report[part] = {"trainable": train, "parameters": count}
    return report


def apply_stage_training(model, trainable: list[str], lora: LoraSettings | None):
    """Freeze per stage; with LoRA the LLM stays frozen and gets adapters, and the other trained parts go in the
    adapter as peft's modules_to_save (peft sets what requires grad). Returns the model to train (a peft model with
    LoRA)."""
    full = [p for p in trainable if not (lora is not None and p == "llm")]
    set_trainable(model, full)
    if lora is not None:
        model = apply_lora(model, lora, [m for part in full for m in parts_of(model)[part]])
    return model


def parameter_groups(model, lr: float, projector_lr: float | None, weight_decay: float,
                     vision_lr: float | None = None) -> list[dict]:
    """AdamW groups per part: the projector and the vision tower may have their own lr (LLaVA-1.5 LoRA's projector
    2e-5; OneVision's tower 2e-6 beside the LLM's 1e-5); biases and norms get no weight decay (as in HF Trainer).
    Each group carries its `part` name for the report."""
    own_lr = {"projector": projector_lr, "vision": vision_lr}
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name)
        decay = param.ndim >= 2
        group = groups.setdefault((part, decay), {
            "params": [], "part": part,
            "lr": own_lr[part] if own_lr.get(part) is not None else lr,
            "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
    return list(groups.values())


def describe_training(model, groups: list[dict]) -> dict:
    """{"trained": {part: {parameters, lr}}, "frozen": {part: parameters}, totals}: what the log and trainable.json
    show, counted on the model as it runs and exports (peft's kept-aside originals left out)."""
    trained: dict[str, dict] = {}
    for group in groups:
        entry = trained.setdefault(group["part"], {"parameters": 0, "lr": group["lr"]})
        entry["parameters"] += sum(numel(p) for p in group["params"])
    frozen: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad and not is_kept_original(name):
            frozen[part_of(name)] = frozen.get(part_of(name), 0) + numel(param)
    return {"trained": trained, "frozen": frozen,
            "trainable_parameters": sum(v["parameters"] for v in trained.values()),
            "total_parameters": sum(v["parameters"] for v in trained.values()) + sum(frozen.values())}


def numel(param: torch.nn.Parameter) -> int:
    """Parameter count, also under ZeRO-3 where the local tensor is an empty shard."""
    return getattr(param, "ds_numel", None) or param.numel()
