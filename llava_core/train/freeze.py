"""Which parameters a stage trains: the stage names parts, this module applies and reports it."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def parts_of(model) -> dict:
    """The named parts of transformers' LlavaForConditionalGeneration."""
    return {
        "vision": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "llm": [model.model.language_model, model.lm_head],
    }


def set_trainable(model, trainable: list[str]) -> dict[str, dict]:
    """Freeze everything but `trainable`; returns {part: {"trainable": bool, "parameters": n}} for the logs."""
    model.requires_grad_(False)
    report = {}
    for part, modules in parts_of(model).items():
        train = part in trainable
        count = 0
        for module in modules:
            module.requires_grad_(train)
            count += sum(p.numel() for p in module.parameters())
        report[part] = {"trainable": train, "parameters": count}
    return report
