"""Padded-token fraction of four batching strategies on a length mix shaped like LLaVA-1.5's 665K instruct data.

The mix (token counts with a Vicuna tokenizer, 576 image tokens per image, max length 2048), approximated from the
published composition of llava_v1_5_mix665k.json:
  158K LLaVA-Instruct conversations   image + multi-turn text, ~250 text tokens (lognormal)
  467K academic VQA / OCR / grounding image + several short QA pairs merged per image, ~90 text tokens
   40K ShareGPT                       text only, long, ~600 tokens, capped at 2048
The strategies use the project's own BatchPlan: `naive` (random order, micro-batch 16, padded to its longest row),
`length_grouped`, `modality_grouped` (LLaVA-1.5's, as its recipes ship), and `packed` (rows of up to 4096 tokens, 2
rows per micro-batch: about the tokens of a naive micro-batch). Rows of 2048 pack worse (printed to stderr, not in
the JSON): image samples are >= 584 tokens, so the gaps they leave can only be filled by the few text-only rows.
Last line: {"naive", "length_grouped", "modality_grouped", "packed", "rows"}, the first four padded fractions.

    PYTHONPATH=. python benchmarks/padding.py [--rows 665000] [--smoke]

--smoke: 2,000 rows on 2 workers (benchmarks/harness.py), a second.
"""
from __future__ import annotations

import argparse
import time

import harness
import numpy as np

from llava_core.train.batching import BatchPlan, padding_fraction

IMAGE_TOKENS, MAX_LENGTH = 576, 2048


def llava_mix_lengths(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    kinds = rng.choice(3, size=rows, p=[158 / 665, 467 / 665, 40 / 665])
    text = np.where(kinds == 0, rng.lognormal(np.log(250), 0.6, rows),
                    np.where(kinds == 1, rng.lognormal(np.log(90), 0.7, rows), rng.lognormal(np.log(600), 0.8, rows)))
    num_images = (kinds != 2).astype(np.int64)
    lengths = np.minimum(np.maximum(text, 8).astype(np.int64) + IMAGE_TOKENS * num_images, MAX_LENGTH)
    return lengths, num_images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=665_000)
    parser.add_argument("--workers", type=int, default=8)
    args = harness.parse_args(parser, smoke={"rows": 2000, "workers": 2})
    lengths, num_images = llava_mix_lengths(args.rows)
    plans = {
        "naive": BatchPlan(args.workers, 16, 1, seed=0),
        "length_grouped": BatchPlan(args.workers, 16, 1, seed=0, sampling="length_grouped"),
        "modality_grouped": BatchPlan(args.workers, 16, 1, seed=0, sampling="modality_grouped"),
        "packed": BatchPlan(args.workers, 2, 1, seed=0, packing=True, pack_length=2 * MAX_LENGTH),
        "packed_2048x4": BatchPlan(args.workers, 4, 1, seed=0, packing=True, pack_length=MAX_LENGTH),
    }
    result = {}
    for name, plan in plans.items():
        started = time.time()
        epoch = plan.epoch_plan(lengths, num_images, 0)
        result[name] = round(padding_fraction(epoch, lengths), 4)
        print(f"{name}: {len(epoch)} micro-batches, padded fraction {result[name]:.4f}, planned in "
              f"{time.time() - started:.1f}s")
    print(f"rows {args.rows}, mean length {lengths.mean():.0f}, text-only {int((num_images == 0).sum())}")
    result.pop("packed_2048x4")
    harness.print_summary({**result, "rows": args.rows})


if __name__ == "__main__":
    main()
