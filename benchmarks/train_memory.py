"""A training rank's memory does not grow with the dataset, and the step does not wait for data.

The project's training stage (`run_training_stage`: Ray Train, 2 CPU workers, DeepSpeed ZeRO-2 over gloo, the
streaming row reader) runs the same number of optimizer steps over N and over 4N rows of 336 px images (default
N=1600: 4N = 6,400 images is past the ~6,300 at which reading every shard into one table overflowed its 32-bit
offsets). Models: the tiny LLM and CLIP stand-ins at image_size 336 with patch 48 (49 image tokens, not 576: the
pixels, which are what a rank holds, are full size; the smaller token count only keeps the CPU steps short). Shards
are written like the failure test's (`write_shard`: 8-row row groups, a quarter of the rows text-only, random
pixels that do not compress), 800 rows each. Both runs sample at random over the whole dataset.

Reports the largest worker's peak RSS (`rss_gib` of the last step: ru_maxrss, max over ranks) per size, their
ratio, and the fraction of step time spent blocked waiting for a batch (sum of `data_wait_s` over sum of step
times, both runs, the first `--warmup` steps left out: the first batch of a run is read cold while nothing else
runs). Last line: {"rss_gib_small", "rss_gib_large", "ratio", "data_wait_fraction", "rows", "steps"}.

    PYTHONPATH=. python benchmarks/train_memory.py [--rows 1600] [--steps 40] [--warmup 3] [--smoke]

--smoke (benchmarks/harness.py): 32 and 128 rows in shards of 16, 4 steps after 1 of warm-up: two training stages
of a few steps, its ratio means nothing at that size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

WORKERS, MICRO = 2, 4


def build_models(root: str) -> dict:
    from llava_core.quickstart.standins import TinyModelConfig, save_tiny_models

    corpus = [f"what colour is the shape {i} it is red blue green" for i in range(200)]
    paths = {"vision": os.path.join(root, "vision"), "llm": os.path.join(root, "llm")}
    save_tiny_models(paths["vision"], paths["llm"], corpus, TinyModelConfig(image_size=336, patch_size=48))
    return paths


def write_shards(models: dict, root: str, rows: int, shard_rows: int) -> list[str]:
    from tests.training_rows import write_shard

    return [write_shard(models, os.path.join(root, f"rows-{k:03d}.parquet"), rows=shard_rows, seed=k)
            for k in range(rows // shard_rows)]


def train(models: dict, shards: list[str], stage_dir: str, steps: int) -> list[dict]:
    """One training stage in its own Ray instance (fresh worker processes: their peak RSS is this run's)."""
    import ray

    from llava_core.config import ScalingSettings, TrainStageSettings
    from llava_core.train.loop import LoopConfig
    from llava_core.train.trainer import run_training_stage

    ray.init(num_cpus=WORKERS, configure_logging=False, log_to_driver=False)
    try:
        stage = TrainStageSettings(dataset="bench", trainable=["projector", "llm"], max_steps=steps,
                                   global_batch_size=MICRO * WORKERS, micro_batch_size=MICRO, lr=1e-4,
                                   zero_stage=2, log_every=10)
        run_training_stage(LoopConfig("bench", stage, ScalingSettings(num_workers=WORKERS), tuple(shards), stage_dir,
                                      models["vision"], models["llm"], save_model=False), "bench")
    finally:
        ray.shutdown()
    return [json.loads(line) for line in open(os.path.join(stage_dir, "metrics.jsonl"))]


def wait_and_step_seconds(history: list[dict], warmup: int) -> tuple[float, float]:
    steps = history[warmup:]
    step_s = steps[-1]["time"] - history[warmup - 1]["time"]
    return sum(r["data_wait_s"] for r in steps), step_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1600, help="N: the small run's rows (the large one has 4N)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shard-rows", type=int, default=800, help="rows per shard; N must be a multiple")
    args = harness.parse_args(parser, smoke={"rows": 32, "steps": 4, "warmup": 1, "shard_rows": 16})
    started = time.time()
    with tempfile.TemporaryDirectory() as root:
        models = build_models(root)
        shards = write_shards(models, root, 4 * args.rows, args.shard_rows)
        small = train(models, shards[: len(shards) // 4], os.path.join(root, "small"), args.steps)
        large = train(models, shards, os.path.join(root, "large"), args.steps)
    assert len(small) == len(large) == args.steps
    waits = [wait_and_step_seconds(h, args.warmup) for h in (small, large)]
    rss_small, rss_large = small[-1]["rss_gib"], large[-1]["rss_gib"]
    print(f"{args.rows} and {4 * args.rows} rows, {args.steps} steps each, {time.time() - started:.0f} s; "
          f"step time {waits[0][1]:.1f} s and {waits[1][1]:.1f} s after warm-up; load average "
          f"{os.getloadavg()[0]:.1f}")
    harness.print_summary({"rss_gib_small": rss_small, "rss_gib_large": rss_large,
                           "ratio": round(rss_large / rss_small, 3),
                           "data_wait_fraction": round(sum(w for w, _ in waits) / sum(s for _, s in waits), 4),
                           "rows": args.rows, "steps": args.steps})


if __name__ == "__main__":
    main()
