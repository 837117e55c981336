"""The project's training step against a bare PyTorch loop, per core, on the same model and batches.

Project: Ray Train `TorchTrainer` with 2 CPU workers (1 core each), DeepSpeed ZeRO-2 over gloo, the project's loop
(`run_training_stage`). Bare: one process, one torch thread, the same model (built the same way, same trainable
parts), the same micro-batches (the project's BatchPlan and collate), AdamW with clipping and accumulation, no Ray,
no DeepSpeed. Throughput counts real (unpadded) tokens over the steps after a warm-up. Ray runs its workers at
niceness 15 (`RAY_worker_niceness`): on a shared, busy machine they get less CPU than a normal process, so the bare
loop runs at the same niceness (after the project's run) to compare like with like. Both still see the machine's
current load: run it on a quiet machine and report the load you saw. Last line:
{"project_tokens_per_s", "bare_tokens_per_s", "ratio", "steps", "warmup"}.

    PYTHONPATH=. python benchmarks/train_step.py [--steps 30] [--warmup 5] [--smoke]

--smoke: 4 steps after 1 of warm-up (benchmarks/harness.py), ~1 minute.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import harness
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MICRO, WORKERS, ACCUM = 8, 2, 2


def build_models(root: str) -> tuple[str, str]:
    from llava_core.quickstart.standins import TinyModelConfig, save_tiny_models

    corpus = [f"what colour is the shape {i} it is red blue green" for i in range(200)]
    vision, llm = os.path.join(root, "vision"), os.path.join(root, "llm")
    save_tiny_models(vision, llm, corpus, TinyModelConfig(llm_hidden=256, llm_layers=4, llm_heads=4,
                                                          vision_layers=2))
    return vision, llm


def project_tokens_per_s(vision, llm, shard, root, steps, warmup, zero_stage) -> float:
    import ray

    from llava_core.config import ScalingSettings, TrainStageSettings
    from llava_core.train.loop import LoopConfig
    from llava_core.train.trainer import run_training_stage

    ray.init(num_cpus=WORKERS, configure_logging=False, log_to_driver=False)
    stage = TrainStageSettings(dataset="bench", trainable=["projector", "llm"], epochs=1,
                               global_batch_size=MICRO * WORKERS * ACCUM, micro_batch_size=MICRO, lr=1e-4,
                               zero_stage=zero_stage, log_every=10)
    stage_dir = os.path.join(root, "stage")
    config = LoopConfig("bench", stage, ScalingSettings(num_workers=WORKERS), (shard,), stage_dir, vision, llm)
    run_training_stage(config, "bench")
    ray.shutdown()
    history = [json.loads(line) for line in open(os.path.join(stage_dir, "metrics.jsonl"))][warmup:steps]
    return sum(r["tokens_per_s"] for r in history) / len(history)


def bare_tokens_per_s(vision, llm, shard, steps, warmup) -> float:
    from llava_core.data.image_layouts import pixel_inputs
    from llava_core.model.build import assemble
    from llava_core.train.batching import BatchPlan, collate_micro_batch
    from llava_core.train.freeze import apply_stage_training
    from llava_core.train.streaming import RowReader, TrainingRows

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, processor = assemble("llava", vision, llm)
    model = apply_stage_training(model, ["projector", "llm"], None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = TrainingRows.open([shard])
    reader = RowReader(rows)
    lengths, images = rows.lengths, rows.num_images
    plan = BatchPlan(WORKERS, MICRO, ACCUM, seed=0)
    pixels = pixel_inputs(processor, "llava", model.config)
    tokens, started = 0, None
    for step in range(steps):
        if step == warmup:
            tokens, started = 0, time.time()
        for rank in range(WORKERS):  # one process does every rank's share: the same work as the 2 workers
            for micro in plan.micro_batches(lengths, images, 0, step, rank):
                picked = np.concatenate(micro)
                collated = collate_micro_batch(reader.take(picked), micro, False, processor.tokenizer.pad_token_id,
                                               pixels)
                batch = {k: v for k, v in collated.items() if v is not None}
                (model(**batch, use_cache=False).loss / (WORKERS * ACCUM)).backward()
                tokens += int(lengths[picked].sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return tokens / (time.time() - started)


def main() -> None:
    from tests.training_rows import write_shard  # the failure test's token rows: image tokens + text

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--zero-stage", type=int, default=2, help="the quickstart's is 2")
    args = harness.parse_args(parser, smoke={"steps": 4, "warmup": 1})
    with tempfile.TemporaryDirectory() as root:
        vision, llm = build_models(root)
        rows = args.steps * MICRO * WORKERS * ACCUM
        shard = write_shard({"vision": vision, "llm": llm}, os.path.join(root, "rows.parquet"), rows=rows)
        load_before = os.getloadavg()[0]
        project = project_tokens_per_s(vision, llm, shard, root, args.steps, args.warmup, args.zero_stage)
        project /= WORKERS  # per core
        os.nice(int(os.environ.get("RAY_worker_niceness", 15)) - os.nice(0))  # as niced as Ray's workers
        bare = bare_tokens_per_s(vision, llm, shard, args.steps, args.warmup)
        print(f"load average before: {load_before:.1f}, after: {os.getloadavg()[0]:.1f} (2 cores)")
    harness.print_summary({"project_tokens_per_s": round(project, 1), "bare_tokens_per_s": round(bare, 1),
                           "ratio": round(project / bare, 3), "steps": args.steps, "warmup": args.warmup})


if __name__ == "__main__":
    main()
