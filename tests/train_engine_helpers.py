"""The training engine built as the worker loop builds it, and the samples it is stepped on, shared by
tests/integration/test_train_engine.py and tests/end_to_end/test_train_engine.py."""
from __future__ import annotations

import torch

from llava_core.config import ScalingSettings, TrainStageSettings


def stage_settings(**overrides) -> TrainStageSettings:
    settings = dict(trainable=["projector", "llm"], global_batch_size=4, micro_batch_size=4, lr=1e-3, zero_stage=0,
                    warmup_ratio=0.0, max_grad_norm=1e9)  # no clipping: gradients are compared as computed
    settings.update(overrides)
    return TrainStageSettings(**settings)


def loop_config(models: dict, stage: TrainStageSettings, world: int = 1):
    from llava_core.train.loop import LoopConfig

    return LoopConfig(stage_name="instruct", stage=stage, scaling=ScalingSettings(num_workers=world), shards=(),
                      plan_index=None, output_dir="", init_from=None, vision_path=models["vision"],
                      llm_path=models["llm"], family="llava", image_layout="pad", template="vicuna_v1",
                      save_model=True, start_time=0.0)


def build(models: dict, stage: TrainStageSettings, world: int = 1, total_steps: int = 10):
    """What train_loop_per_worker does before its first step."""
    from llava_core.train.engine import build_engine, deepspeed_config, zero3_loading
    from llava_core.train.loop import build_model

    with zero3_loading(deepspeed_config(stage, world, False)):
        model, processor = build_model(loop_config(models, stage, world), torch.device("cpu"))
    engine, _, _ = build_engine(model, stage, world, total_steps, False, torch.device("cpu"))
    return engine, processor


def samples(engine, count: int = 8, seed: int = 0) -> list[dict]:
    """Single samples with an image and very different numbers of supervised tokens (30, then 2)."""
    from llava_core.model.lora import llava_of

    config = llava_of(engine.module).config
    g = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    rows = []
    for i in range(count):
        answer = 30 if i < count // 2 else 2  # long answers first: micro-batches differ in composition
        text = torch.randint(5, 100, (1, 6 + answer), generator=g)
        ids = torch.cat([text[:, :3], torch.full((1, config.image_seq_length), config.image_token_index),
                         text[:, 3:]], dim=1)
        labels = torch.full_like(ids, -100)
        labels[:, -answer:] = ids[:, -answer:]
        rows.append({"input_ids": ids, "labels": labels, "pixel_values": torch.randn(1, 3, size, size, generator=g)})
    return rows


def batch_of(rows: list[dict]) -> dict:
    """Right-padded, as collate pads."""
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
           "labels": torch.full((len(rows), width), -100, dtype=torch.long),
           "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
           "pixel_values": torch.cat([r["pixel_values"] for r in rows])}
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        out["input_ids"][i, :n], out["labels"][i, :n], out["attention_mask"][i, :n] = r["input_ids"], r["labels"], 1
    return out
