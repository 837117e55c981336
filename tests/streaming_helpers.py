"""Shards in the prepare stage's layout and the micro-batches they must stream as, shared by
tests/unit/test_streaming.py and tests/integration/test_streaming.py (the fixture reaches them through
tests/conftest.py's pytest_plugins)."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llava_core.data.image_layouts import CropPixels
from llava_core.train.batching import BatchPlan, collate, collate_packed
from llava_core.train.streaming import BatchPrefetcher, TrainingRows

IMAGE_SHAPE = (3, 8, 8)
PIXELS = CropPixels(IMAGE_SHAPE)
SHARD_ROWS = (21, 16, 27)  # uneven, so row groups and shards end at different places
GROUP_ROWS = 4


def shard_table(rows: int, seed: int) -> pa.Table:
    """Rows in the prepare stage's layout; every third one text-only, images as uint8 crops with an affine."""
    rng = np.random.default_rng(seed)
    table = {"input_ids": [], "labels": [], "pixel_values": [], "num_images": [], "length": []}
    for i in range(rows):
        images = 0 if i % 3 == 0 else 1 + i % 2
        ids = rng.integers(5, 60, size=int(rng.integers(4, 20)) + 3 * images).tolist()
        labels = [-100] * (len(ids) // 2) + ids[len(ids) // 2:]
        crop = rng.integers(0, 256, (images, *IMAGE_SHAPE), dtype=np.uint8).tobytes()
        pixels = {"uint8": crop, "scale": [2 / 255] * 3, "offset": [-1.0] * 3}
        for key, value in (("input_ids", ids), ("labels", labels), ("pixel_values", pixels),
                           ("num_images", images), ("length", len(ids))):
            table[key].append(value)
    return pa.table(table)


@pytest.fixture
def shards(tmp_path):
    paths = []
    for k, rows in enumerate(SHARD_ROWS):
        paths.append(str(tmp_path / f"shard-{k}.parquet"))
        pq.write_table(shard_table(rows, seed=k), paths[-1], row_group_size=GROUP_ROWS)
    return paths


def in_memory(paths) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in paths]).combine_chunks()


def plan_for(rows: TrainingRows, packing: bool) -> tuple[BatchPlan, list[int]]:
    plan = BatchPlan(world_size=2, micro_batch_size=1 if packing else 2, grad_accum=2, seed=3, packing=packing,
                     pack_length=32)
    return plan, [plan.steps_in_epoch(rows.lengths, rows.num_images, e) for e in range(2)]


def expected_batches(table, plan, epoch_steps, start_step, rank, packing):
    """What the loop collated before streaming: the plan's micro-batches, from the whole table in memory."""
    lengths, images = table.column("length").to_numpy(), table.column("num_images").to_numpy()
    out = []
    for micro in plan.rank_micro_batches(lengths, images, epoch_steps, start_step, rank):
        if packing:
            out.append(collate_packed(table, micro, 0, PIXELS))
        else:
            out.append(collate(table, np.concatenate(micro), 0, PIXELS))
    return out


def assert_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key in want:
        if want[key] is None:
            assert got[key] is None, key
        else:
            assert torch.equal(got[key], want[key]), key


def streamed(rows, plan, epoch_steps, start_step, rank, packing, depth=3):
    stream = plan.rank_micro_batches(rows.lengths, rows.num_images, epoch_steps, start_step, rank)
    with BatchPrefetcher(rows, stream, packing, 0, PIXELS, depth=depth, cache_bytes=2**14) as batches:
        return [ready.batch for ready in batches]


def assert_same_rows(got: TrainingRows, want: TrainingRows):
    assert got.shards == want.shards
    for field in ("shard_rows", "lengths", "num_images", "group_starts", "group_shard", "group_in_shard"):
        assert getattr(got, field).dtype == getattr(want, field).dtype, field
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
