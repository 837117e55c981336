"""The batch plan: equal step counts on every rank, every row once per epoch, deterministic; grouping and packing."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from llava_core.data.image_layouts import CropPixels
from llava_core.train.batching import (
    BatchPlan,
    capped_steps,
    collate,
    collate_micro_batch,
    collate_packed,
    epoch_and_step,
    pack,
    padding_fraction,
)


def flat(micro_batches):
    return [int(i) for micro in micro_batches for row in micro for i in row]


def test_every_rank_gets_the_same_number_of_disjoint_batches():
    plan = BatchPlan(world_size=2, micro_batch_size=3, grad_accum=2, seed=7)
    lengths, images = np.arange(50) + 1, np.ones(50, dtype=int)
    assert plan.steps_in_epoch(lengths, images, 0) == 4  # 50 // 12; the partial global batch is dropped
    seen = []
    for step in range(4):
        per_rank = [plan.micro_batches(lengths, images, epoch=0, step=step, rank=r) for r in range(2)]
        assert [len(m) for m in per_rank] == [2, 2] and all(len(b) == 3 for m in per_rank for b in m)
        seen += [i for m in per_rank for i in flat(m)]
    assert len(seen) == len(set(seen)) == 48
    again = BatchPlan(world_size=2, micro_batch_size=3, grad_accum=2, seed=7)
    assert flat(again.micro_batches(lengths, images, 0, 1, 1)) == flat(plan.micro_batches(lengths, images, 0, 1, 1))
    assert flat(plan.micro_batches(lengths, images, 1, 1, 1)) != flat(plan.micro_batches(lengths, images, 0, 1, 1))


def test_length_grouping_puts_similar_lengths_in_a_step_and_pads_less():
    rng = np.random.default_rng(0)
    lengths, images = rng.integers(10, 500, size=2000), np.ones(2000, dtype=int)
    naive = BatchPlan(2, 8, 2, seed=1)
    grouped = BatchPlan(2, 8, 2, seed=1, sampling="length_grouped")
    assert grouped.steps_in_epoch(lengths, images, 0) == naive.steps_in_epoch(lengths, images, 0) == 62
    for step in range(3):
        in_step = [i for r in range(2) for i in flat(grouped.micro_batches(lengths, images, 0, step, r))]
        assert lengths[in_step].max() - lengths[in_step].min() < 150  # one sorted slice of a window of 16 steps
    used = flat(grouped.epoch_plan(lengths, images, 0))
    assert len(used) == len(set(used)) == 62 * 32  # each row at most once; only the last partial batch is dropped
    assert (padding_fraction(grouped.epoch_plan(lengths, images, 0), lengths)
            < padding_fraction(naive.epoch_plan(lengths, images, 0), lengths) / 5)


def test_modality_grouping_keeps_text_only_rows_in_their_own_steps():
    rng = np.random.default_rng(1)
    images = (rng.random(640) > 0.25).astype(int)
    lengths = rng.integers(10, 300, size=640)
    plan = BatchPlan(2, 4, 1, seed=3, sampling="modality_grouped")
    steps = plan.steps_in_epoch(lengths, images, 0)
    mixed = 0
    for step in range(steps):
        rows = [i for r in range(2) for i in flat(plan.micro_batches(lengths, images, 0, step, r))]
        mixed += len(set(images[rows].tolist())) > 1
    assert steps == 80 and mixed <= 1  # only the leftovers of the two modalities may share a step


def test_packing_fills_rows_and_keeps_every_sample_once():
    rng = np.random.default_rng(2)
    lengths = rng.integers(20, 200, size=3000)
    bins = pack(rng.permutation(3000), lengths, capacity=512)
    assert sorted(int(i) for b in bins for i in b) == list(range(3000))
    assert all(lengths[b].sum() <= 512 for b in bins)
    assert lengths.sum() / (512 * len(bins)) > 0.97
    with pytest.raises(ValueError, match="pack_length"):
        pack(np.arange(3), np.array([10, 600, 20]), capacity=512)


def test_collate_pads_and_keeps_images_in_row_order():
    def image(v):  # stored uint8 crops + the affine back to normalised float pixels
        return {"uint8": np.full((3, 2, 2), v, dtype=np.uint8).tobytes(), "scale": [2.0, 1.0, 1.0],
                "offset": [-1.0, 0.0, 0.5]}
    table = pa.table({
        "input_ids": [[5, 6, 7], [8], [9, 9]], "labels": [[-100, 6, 7], [8], [-100, 9]],
        "pixel_values": [image(1), {"uint8": b"", "scale": [1.0] * 3, "offset": [0.0] * 3}, image(3)],
        "num_images": [1, 0, 1], "length": [3, 1, 2]})
    batch = collate(table, np.array([2, 1, 0]), pad_token_id=0, pixels=CropPixels((3, 2, 2)))
    assert batch["input_ids"].tolist() == [[9, 9, 0], [8, 0, 0], [5, 6, 7]]
    assert batch["labels"].tolist() == [[-100, 9, -100], [8, -100, -100], [-100, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert batch["pixel_values"].shape == (2, 3, 2, 2) and batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"][:, 0, 0, 0], torch.tensor([5.0, 1.0]))  # 3*2-1, 1*2-1: rows 2 then 0
    assert torch.equal(batch["pixel_values"][0, :, 1, 1], torch.tensor([5.0, 3.0, 3.5]))  # per-channel affine

    packed = collate_packed(table, [np.array([2, 1]), np.array([0])], pad_token_id=0, pixels=CropPixels((3, 2, 2)))
    assert packed["input_ids"].tolist() == [[9, 9, 8], [5, 6, 7]]
    assert packed["position_ids"].tolist() == [[0, 1, 0], [0, 1, 2]]
    assert packed["labels"].tolist() == [[-100, 9, -100], [-100, 6, 7]]  # a sample's first token is never a target
    assert torch.equal(packed["pixel_values"][:, 0, 0, 0], torch.tensor([5.0, 1.0]))  # images follow their samples
    assert "attention_mask" not in packed


def test_a_global_step_maps_to_its_epoch_and_step_within_it():
    assert [epoch_and_step(s, [3, 2]) for s in (0, 2, 3, 4)] == [(0, 0), (0, 2), (1, 0), (1, 1)]


def test_max_steps_caps_the_epochs_and_a_rank_streams_its_micro_batches_from_a_resumed_step():
    assert capped_steps([3, 3, 3], 4) == [3, 1] and capped_steps([3, 3], 10) == [3, 3]
    plan = BatchPlan(world_size=2, micro_batch_size=2, grad_accum=2, seed=0)
    lengths, images = np.arange(40) + 1, np.ones(40, dtype=int)
    epoch_steps = capped_steps([plan.steps_in_epoch(lengths, images, e) for e in range(2)], 7)
    assert epoch_steps == [5, 2]
    stream = list(plan.rank_micro_batches(lengths, images, epoch_steps, start_step=4, rank=1))
    expected = [plan.micro_batches(lengths, images, e, s, 1) for e, s in ((0, 4), (1, 0), (1, 1))]
    assert [flat([m]) for m in stream] == [flat([m]) for step in expected for m in step]


def test_pairs_collate_as_their_chosen_then_rejected_sequences_each_with_its_pairs_image():
    """n pairs -> 2n rows, the chosen ones first; the images follow the rows (decoded once per pair), exactly as if
    every sequence were a row of its own carrying its pair's image."""
    def image(v):
        return {"uint8": np.full((3, 2, 2), v, dtype=np.uint8).tobytes(), "scale": [1.0] * 3, "offset": [0.0] * 3}
    no_image = {"uint8": b"", "scale": [1.0] * 3, "offset": [0.0] * 3}
    pairs = pa.table({"input_ids": [[5, 6, 7], [8, 9]], "labels": [[-100, 6, 7], [-100, 9]],
                      "rejected_input_ids": [[5, 6], [8, 4, 4]], "rejected_labels": [[-100, 6], [-100, 4, 4]],
                      "pixel_values": [image(1), image(3)]})
    batch = collate_micro_batch(pairs, [np.array([0]), np.array([1])], False, 0, CropPixels((3, 2, 2)), pairs=True)
    as_rows = pa.table({"input_ids": [[5, 6, 7], [8, 9], [5, 6], [8, 4, 4]],
                        "labels": [[-100, 6, 7], [-100, 9], [-100, 6], [-100, 4, 4]],
                        "pixel_values": [image(1), image(3), image(1), image(3)]})
    expected = collate(as_rows, np.arange(4), pad_token_id=0, pixels=CropPixels((3, 2, 2)))
    assert batch.keys() == expected.keys()
    assert all(torch.equal(batch[k], expected[k]) for k in expected)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0, 1.0, 3.0]
    text_only = pairs.set_column(4, "pixel_values", pa.array([no_image, no_image]))
    unimaged = collate_micro_batch(text_only, [np.array([0]), np.array([1])], False, 0, CropPixels((3, 2, 2)),
                                   pairs=True)
    assert unimaged["pixel_values"] is None and unimaged["input_ids"].shape == (4, 3)
