"""Prepare-stage throughput: the Ray Data pipeline on all cores against the same work in one process on one core.

Builds (or reuses, under --cache-dir) a LLaVA-layout dataset of --rows image rows (640x480 JPEGs, multi-turn
vicuna_v1 conversations), a CLIP ViT-L/14-336-shaped image processor config (336 px crops, 576 image tokens per
image) and a byte-level BPE tokenizer trained on the spot; nothing is downloaded. Then:

- pipeline: `prepare_dataset` on a local Ray with --cores CPUs and as many actors (staging, decode/pad/process,
  template + tokenize + mask, parquet shards, rejects), timed from the call to its return (Ray start-up excluded,
  actor start-up included);
- floor: the same `RowPreparer` work and a parquet write in a child process pinned to one core with one thread,
  timed on --floor-rows rows before and after the pipeline (averaged: on a shared machine the load drifts).

Last line: {"samples_per_s", "floor_samples_per_s_single_core", "cores", "efficiency", "rows", "floor_rows"} with
efficiency = samples_per_s / (cores * floor). Run it on a quiet machine: other load shows up as lost efficiency.

    PYTHONPATH=. python benchmarks/prepare_throughput.py [--rows 2000] [--cores 2] [--smoke]

--smoke (benchmarks/harness.py): 16 rows, a floor of 8, 1 core.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import harness
import numpy as np

QUESTIONS = ["What is in the picture?", "Describe the colours you see.", "Where is the brightest area?",
             "How many shapes are there?", "What might this scene be used for?"]
WORDS = ("the a red green blue large small bright dark shape circle square left right top bottom centre image shows "
         "there is are of in on with and near far light shadow texture pattern edge corner").split()


def build_dataset(cache_dir: str, rows: int, seed: int = 0) -> dict:
    """Images, annotations and models under `cache_dir/rows-<rows>` (one folder per size: the annotations file of
    one size must not replace another's); reused when its `.complete` says they are there."""
    root = os.path.join(cache_dir, f"rows-{rows}")
    paths = {"annotations": os.path.join(root, "llava.json"), "images": os.path.join(root, "images"),
             "vision": os.path.join(root, "vision"), "llm": os.path.join(root, "llm")}
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker):
        return paths
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(paths["images"], exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640]
    annotations, corpus = [], []
    for i in range(rows):
        base = rng.uniform(0, 255, 3)[:, None, None] * (0.5 + 0.5 * np.sin(xx / rng.uniform(20, 80) + i)[None])
        noisy = base + rng.normal(0, 12, (3, 480, 640))  # photo-like: smooth structure plus sensor noise
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8).transpose(1, 2, 0))
        image.save(os.path.join(paths["images"], f"{i:06d}.jpg"), quality=90)
        turns = []
        for t in range(int(rng.integers(1, 4))):
            question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
            answer = " ".join(rng.choice(WORDS, size=int(rng.integers(10, 60))))
            turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + question},
                      {"from": "gpt", "value": answer}]
            corpus += [question, answer]
        annotations.append({"id": f"bench-{i}", "image": f"{i:06d}.jpg", "conversations": turns})
    with open(paths["annotations"], "w") as f:
        json.dump(annotations, f)
    save_models(paths["vision"], paths["llm"], corpus)
    open(marker, "w").close()
    return paths


def save_models(vision_path: str, llm_path: str, corpus: list[str]) -> None:
    """Stand-ins of CLIP ViT-L/14-336 (its geometry and legacy processor config) and Vicuna's tokenizer."""
    from llava_core.quickstart.standins import TinyModelConfig, save_clip, save_vicuna

    geometry = TinyModelConfig(image_size=336, patch_size=14, vision_layers=1, vocab_size=2000)
    save_clip(vision_path, geometry)
    save_vicuna(llm_path, corpus, geometry)


SETTINGS = {"max_length": 2048, "too_long": "reject", "image_aspect_ratio": "pad", "max_image_pixels": 64_000_000}


def run_pipeline(paths: dict, cores: int, out_dir: str) -> tuple[float, dict]:
    import ray

    from llava_core.config import SourceSettings
    from llava_core.data.pipeline import prepare_dataset
    from llava_core.data.rows import RowSettings

    ray.init(num_cpus=cores, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        settings = RowSettings(template="vicuna_v1", num_actors=cores, rows_per_shard=1000, **SETTINGS)
        entry, _ = prepare_dataset("bench", [SourceSettings(paths["annotations"], paths["images"])], paths["vision"],
                                   paths["llm"], settings, out_dir)
        return time.perf_counter() - start, entry
    finally:
        ray.shutdown()


def run_floor(paths: dict, rows: int, out_dir: str) -> float:
    """Seconds for `rows` rows on one core: the RowPreparer work, then the parquet write of what it produced."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llava_core.config import SourceSettings
    from llava_core.data.rows import RowPreparer
    from llava_core.data.sources import staged_blocks

    start = time.perf_counter()
    preparer = RowPreparer(paths["vision"], paths["llm"],
                           {"template": "vicuna_v1", "image_folder": paths["images"], **SETTINGS})
    outputs, done = [], 0
    for block in staged_blocks(SourceSettings(paths["annotations"], paths["images"])):
        if done >= rows:
            break
        block = block.slice(0, rows - done)
        for batch in block.to_batches(max_chunksize=32):
            outputs.append(preparer(pa.Table.from_batches([batch])))
        done += block.num_rows
    table = pa.concat_tables(outputs)
    pq.write_table(table, os.path.join(out_dir, "floor.parquet"))
    assert (np.asarray(table.column("reason").to_pylist()) == "").all(), "the benchmark rows must all be good"
    return time.perf_counter() - start


def run_floor_child(args) -> float:
    """The floor in a child process pinned to one core, with one thread for every math library."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, __file__, "--floor-only", "--rows", str(args.rows),
                            "--floor-rows", str(args.floor_rows), "--cache-dir", args.cache_dir],
                           env=env, capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])["floor_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--floor-rows", type=int, default=500, help="rows timed for the single-core floor")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/llava-ray/prepare-bench"))
    parser.add_argument("--floor-only", action="store_true", help=argparse.SUPPRESS)  # the pinned child process
    args = harness.parse_args(parser, smoke={"rows": 16, "floor_rows": 8, "cores": 1})

    paths = build_dataset(args.cache_dir, args.rows)
    with tempfile.TemporaryDirectory() as out_dir:
        if args.floor_only:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
            harness.print_summary({"floor_s": run_floor(paths, args.floor_rows, out_dir)})
            return
        # The floor runs before and after the pipeline and the two are averaged: on a shared machine the load drifts.
        loads = [os.getloadavg()[0]]
        floor_before = run_floor_child(args)
        seconds, entry = run_pipeline(paths, args.cores, out_dir)
        loads.append(os.getloadavg()[0])
        floor_after = run_floor_child(args)
        loads.append(os.getloadavg()[0])
    assert entry["rows_written"] == args.rows, entry
    floor_s = (floor_before + floor_after) / 2
    floor = args.floor_rows / floor_s
    samples_per_s = args.rows / seconds
    print(f"pipeline: {args.rows} rows in {seconds:.1f} s on {args.cores} cores; floor: {args.floor_rows} rows in "
          f"{floor_before:.1f} s before, {floor_after:.1f} s after, on one core; 1-min load average at start, after "
          f"the pipeline, at the end: {', '.join(f'{x:.2f}' for x in loads)}", file=sys.stderr)
    harness.print_summary({"samples_per_s": round(samples_per_s, 2), "floor_samples_per_s_single_core": round(floor, 2),
                           "cores": args.cores, "efficiency": round(samples_per_s / (args.cores * floor), 3),
                           "rows": args.rows, "floor_rows": args.floor_rows})


if __name__ == "__main__":
    main()
