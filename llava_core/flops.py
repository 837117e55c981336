"""One FLOP model and one GPU peak table, for the plan (`llava-ray validate --plan`) and the runtime MFU alike.

Model FLOPs, the quantity MFU conventionally counts: per parameter and per position it runs on, 6 for parts whose
weights train (forward + the two backward matmuls), 4 for frozen parts that gradients flow through (forward +
input gradients: the LLM under a trained projector or LoRA), 2 for frozen parts that only run forward (a frozen
vision tower). The LLM (and its LoRA adapters, always 6) runs on every token, image tokens included, except its
lm_head, which the training loss runs only where a label is supervised (`train/loss.py`); the projector on each
image's tokens; the vision tower on each image's patches plus CLS. The LLM's input embedding table (a lookup)
is left out; norms and the tower's position embeddings are in (a fraction of a percent).

Attention's two matmuls per layer (scores Q.K^T and their weighted sum of V) have no weights: 4 x s^2 x width forward
FLOPs over a sequence of s positions in both directions (the vision tower), half of that causal (the LLM, as flash
attention computes it), with `width` = heads x head size. Their backward costs twice the forward wherever gradients
flow through the part (input gradients need both), so 3x the forward then, 1x for a forward-only part. They grow
with each sequence's length squared: the LLM's are counted from the micro-batch's sum of squared sample lengths
(packed samples attend within their own segment). LLaVA-1.5's ~800 tokens add ~2% to the trained 7B's count,
OneVision's ~8K tokens ~15%.

Gradient checkpointing runs the checkpointed forward once more (~1/3 more hardware FLOPs for a trained LLM), but
that recomputation is not model FLOPs: the runtime does not count it, and the plan's time estimate divides the same
model FLOPs by an MFU, so an MFU measured on one predicts the other.

Who knows the part sizes: the runtime counts them from the model's parameters (`llava_core.train.metrics`), the
plan from configs or known architectures (`llava_core.plan`); both end in `training_flops`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PartSizes:
    """Parameters per part, as the FLOP model counts them, and the positions the image parts run on per image."""
    vision: int
    projector: int
    llm: int  # without the input embedding table and the lm_head
    lm_head: int  # runs only at supervised positions (`train/loss.py`); counted even when tied to the embeddings
    lora: int  # 0 without LoRA
    vision_positions: int  # patches + CLS
    image_tokens: int  # projector outputs placed into the LLM's sequence
    llm_layers: int
    llm_attention_width: int  # attention heads x head size
    vision_layers: int  # tower layers that run
    vision_width: int


def coefficients(trainable: list[str], lora: bool) -> dict[str, int]:
    """Model FLOPs per parameter per position: 6 trained, 4 frozen with gradients passing through, 2 forward-only.
    Gradients pass through a frozen part when a part before it trains (vision -> projector -> LLM) or LoRA sits in
    it (the LLM)."""
    vision = 6 if "vision" in trainable else 2
    projector = 6 if "projector" in trainable else (4 if vision == 6 else 2)
    llm_trains = "llm" in trainable and not lora
    llm = 6 if llm_trains else (4 if (lora or projector >= 4) else 2)
    return {"vision": vision, "projector": projector, "llm": llm, "lora": 6}


def training_flops(sizes: PartSizes, trainable: list[str], lora: bool):
    """A function (tokens, images, squared_lengths, supervised) -> model FLOPs of a micro-batch (or, with averages,
    of a row) for this stage; `squared_lengths` is the sum of each sample's token count squared (for the LLM's
    attention), `supervised` the tokens with a label (the lm_head runs there only)."""
    coef = coefficients(trainable, lora)
    per_token = coef["llm"] * sizes.llm + coef["lora"] * sizes.lora
    vision_attention = (3 if coef["vision"] == 6 else 1) * 4 * sizes.vision_width * sizes.vision_positions ** 2
    per_image = (coef["projector"] * sizes.projector * sizes.image_tokens
                 + coef["vision"] * sizes.vision * sizes.vision_positions
                 + sizes.vision_layers * vision_attention)
    # Causal: 2 x s^2 x width forward per layer; gradients flow through the LLM whenever anything trains in it or
    # before it (coefficient 4 or 6)
    per_squared_length = (3 if coef["llm"] >= 4 else 1) * 2 * sizes.llm_attention_width * sizes.llm_layers

    per_supervised = coef["llm"] * sizes.lm_head  # trained with the LLM; else gradients flow through it

    def flops(tokens: float, images: float, squared_lengths: float, supervised: float) -> float:
        return float(per_token * tokens + per_image * images + per_squared_length * squared_lengths
                     + per_supervised * supervised)

    return flops


@dataclass(frozen=True)
class Gpu:
    tflops: float  # dense bf16 peak (vendor spec sheet, without sparsity)
    memory_gb: int
    device_name: str  # a pattern matched against torch.cuda.get_device_name(), case-insensitively


# Keys are the plan's `--gpu` choices. Order matters where one name contains another: "NVIDIA H100 NVL" and
# "NVIDIA H100 PCIe" are tried before the SXM part's "NVIDIA H100 80GB HBM3", the A100's 40 GB names before the
# 80 GB ones. Word boundaries keep "L4" out of "L40S" and "H200" out of "GH200"; the H200 NVL (a lower peak) is
# not listed, so it gets no MFU rather than a wrong one.
GPUS = {
    "h100-nvl": Gpu(835.0, 94, r"\bH100\b.*\bNVL\b"),
    "h100-pcie": Gpu(756.0, 80, r"\bH100\b.*\bPCIe\b"),
    "h100-sxm": Gpu(989.0, 80, r"\bH100\b"),
    "h200": Gpu(989.0, 141, r"\bH200\b(?!.*\bNVL\b)"),
    "a100-40gb": Gpu(312.0, 40, r"\bA100\b.*\b40GB\b"),
    "a100-80gb": Gpu(312.0, 80, r"\bA100\b"),
    "l40s": Gpu(362.0, 48, r"\bL40S\b"),
    "l4": Gpu(121.0, 24, r"\bL4\b"),
}


def gpu_for_device(device_name: str) -> str | None:
    """The GPUS key of a CUDA device name, or None for a device not in the table."""
    for key, gpu in GPUS.items():
        if re.search(gpu.device_name, device_name, re.IGNORECASE):
            return key
    return None
