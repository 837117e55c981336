"""Per-step training metrics from rank 0: metrics.jsonl, TensorBoard, and MLflow or W&B when configured.

MFU counts matmul FLOPs per token from parameter counts: 6N for parts whose weights train (forward + both
backward matmuls), 4N for frozen parts that gradients flow through (forward + input gradients: the LLM when the
projector or LoRA trains), 2N for frozen parts that only run forward (a frozen vision tower). The LLM counts every
token, the projector image tokens only, the vision tower its patches (+CLS) per image. Attention score FLOPs and
the input embedding table are left out, so the figure is a slight underestimate.
"""
from __future__ import annotations

import json
import os
import resource

# Dense bf16 peak per device (vendor spec sheets), for MFU when scaling.peak_tflops_per_worker is not set.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_flops(configured_tflops: float | None, use_gpu: bool) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if use_gpu:
        import torch

        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None  # CPU: no meaningful peak, no MFU


def flops_coefficients(trainable: list[str], lora: bool) -> dict[str, int]:
    """Per-part FLOPs per parameter per token: 6 trained, 4 frozen with gradients passing through, 2 forward-only."""
    vision = 6 if "vision" in trainable else 2
    projector = 6 if "projector" in trainable else (4 if vision == 6 else 2)
    llm_trains = "llm" in trainable and not lora
    llm = 6 if llm_trains else (4 if (lora or projector >= 4) else 2)
    return {"vision": vision, "projector": projector, "llm": llm, "lora": 6}


def flops_counter(model, trainable: list[str], lora: bool):
    """A function (tokens, images) -> training FLOPs of one micro-batch, for this model and stage."""
    from llava_core.model.lora import llava_of
    from llava_core.train.freeze import numel, part_of

    counts = {"vision": 0, "projector": 0, "llm": 0, "lora": 0}
    embed = llava_of(model).get_input_embeddings().weight
    for name, param in model.named_parameters():
        if param is not embed:  # a lookup, not a matmul
            counts[part_of(name)] += numel(param)
    coef = flops_coefficients(trainable, lora)
    vision_config = llava_of(model).config.vision_config
    image_tokens = llava_of(model).config.image_seq_length
    patches = (vision_config.image_size // vision_config.patch_size) ** 2 + 1

    def flops(tokens: int, images: int) -> float:
        return float((coef["llm"] * counts["llm"] + coef["lora"] * counts["lora"]) * tokens
                     + coef["projector"] * counts["projector"] * image_tokens * images
                     + coef["vision"] * counts["vision"] * patches * images)

    return flops


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsWriter:
    """Rank 0's sinks besides metrics.jsonl (written with the stage output from the checkpointed history)."""

    def __init__(self, stage_name: str, stage: dict, tensorboard_dir: str):
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(tensorboard_dir)
        self.tracker = stage["tracking"]
        if self.tracker == "mlflow":
            import mlflow  # only imported when configured; MLFLOW_TRACKING_URI says where

            mlflow.start_run(run_name=stage_name)
            mlflow.log_params({k: v for k, v in stage.items() if isinstance(v, (int, float, str, bool))})
        elif self.tracker == "wandb":
            import wandb  # only imported when configured; WANDB_PROJECT / WANDB_API_KEY from the environment

            wandb.init(project=os.environ.get("WANDB_PROJECT", "llava-ray"), name=stage_name, config=stage)

    def write(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        for key, value in values.items():
            self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
        if self.tracker == "mlflow":
            import mlflow

            mlflow.log_metrics(values, step=record["step"])
        elif self.tracker == "wandb":
            import wandb

            wandb.log(values, step=record["step"])

    def close(self) -> None:
        self.tensorboard.close()
        if self.tracker == "mlflow":
            import mlflow

            mlflow.end_run()
        elif self.tracker == "wandb":
            import wandb

            wandb.finish()


def plot_loss_curves(histories: dict[str, list[dict]], path: str) -> None:
    """One PNG with each stage's loss per step, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for ax, (stage, history) in zip(axes[0], histories.items()):
        ax.plot([r["step"] for r in history], [r["loss"] for r in history])
        ax.set(title=f"{stage} loss", xlabel="optimizer step", ylabel="loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_history(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
