"""The batch plan: equal step counts on every rank, every row once per epoch, deterministic."""
import numpy as np
import pyarrow as pa
import torch

from llava_core.train.batching import BatchPlan, collate
from llava_core.train.loop import cosine_with_warmup


def test_every_rank_gets_the_same_number_of_disjoint_batches():
    plan = BatchPlan(world_size=2, micro_batch_size=3, grad_accum=2, seed=7)
    rows = 50
    assert plan.steps_per_epoch(rows) == 4  # 50 // 12; the partial global batch is dropped
    seen = []
    for step in range(plan.steps_per_epoch(rows)):
        per_rank = [plan.micro_batches(rows, epoch=0, step=step, rank=r) for r in range(2)]
        assert [len(m) for m in per_rank] == [2, 2] and all(len(b) == 3 for m in per_rank for b in m)
        seen += [i for m in per_rank for b in m for i in b]
    assert len(seen) == len(set(seen)) == 48
    again = plan.micro_batches(rows, epoch=0, step=1, rank=1)
    assert all((a == b).all() for a, b in zip(again, plan.micro_batches(rows, 0, 1, 1)))
    other_epoch = plan.micro_batches(rows, epoch=1, step=1, rank=1)
    assert any((a != b).any() for a, b in zip(again, other_epoch))


def test_collate_pads_and_keeps_images_in_row_order():
    def image(v):  # stored uint8 crops + the affine back to normalised float pixels
        return {"uint8": np.full((3, 2, 2), v, dtype=np.uint8).tobytes(), "scale": [2.0, 1.0, 1.0],
                "offset": [-1.0, 0.0, 0.5]}
    table = pa.table({
        "input_ids": [[5, 6, 7], [8], [9, 9]], "labels": [[-100, 6, 7], [8], [-100, 9]],
        "pixel_values": [image(1), {"uint8": b"", "scale": [1.0] * 3, "offset": [0.0] * 3}, image(3)],
        "num_images": [1, 0, 1], "length": [3, 1, 2]})
    batch = collate(table, np.array([2, 1, 0]), pad_token_id=0, image_shape=(3, 2, 2))
    assert batch["input_ids"].tolist() == [[9, 9, 0], [8, 0, 0], [5, 6, 7]]
    assert batch["labels"].tolist() == [[-100, 9, -100], [8, -100, -100], [-100, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert batch["pixel_values"].shape == (2, 3, 2, 2) and batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"][:, 0, 0, 0], torch.tensor([5.0, 1.0]))  # 3*2-1, 1*2-1: rows 2 then 0
    assert torch.equal(batch["pixel_values"][0, :, 1, 1], torch.tensor([5.0, 3.0, 3.5]))  # per-channel affine


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factor = cosine_with_warmup(total_steps=100, warmup_ratio=0.03)
    assert [round(factor(s), 3) for s in (0, 1, 2)] == [0.333, 0.667, 1.0]
    assert factor(51) < 0.55 and factor(99) < 0.001
