"""From prepared parquet shards to micro-batches, identically planned on every rank.

Each rank reads the (small) per-row columns, then every epoch draws the same seeded permutation and takes its own
micro-batches from it: every rank runs exactly the same number of steps (unequal counts hang collective ops), and a
resumed run continues with exactly the batches it would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llava_core import storage
from llava_core.data.templates import IGNORE_INDEX

COLUMNS = ["input_ids", "labels", "pixel_values", "num_images", "length"]


@dataclass
class BatchPlan:
    world_size: int
    micro_batch_size: int
    grad_accum: int
    seed: int

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum

    def steps_per_epoch(self, num_rows: int) -> int:
        return num_rows // self.global_batch_size  # the last, partial global batch is dropped, as by LLaVA

    def micro_batches(self, num_rows: int, epoch: int, step: int, rank: int) -> list[np.ndarray]:
        """Row indices of this rank's `grad_accum` micro-batches for optimizer step `step` of `epoch`."""
        order = np.random.default_rng([self.seed, epoch]).permutation(num_rows)
        start = step * self.global_batch_size
        step_rows = order[start:start + self.global_batch_size]
        micro = step_rows.reshape(self.world_size * self.grad_accum, self.micro_batch_size)
        return [micro[k] for k in range(rank, len(micro), self.world_size)]


def load_examples(shard_paths: list[str]) -> pa.Table:
    tables = []
    for path in shard_paths:
        fs, inner = storage.filesystem(path)
        tables.append(pq.read_table(inner, filesystem=fs, columns=COLUMNS))
    if not tables:
        raise ValueError("no prepared shards to train on: did the prepare stage write any rows?")
    return pa.concat_tables(tables).combine_chunks()


def collate(table: pa.Table, rows: np.ndarray, pad_token_id: int, image_shape: tuple[int, int, int]) -> dict:
    """Right-padded input_ids/labels/attention_mask and the rows' images in order (None when there are none)."""
    picked = table.take(pa.array(rows))
    ids = picked.column("input_ids").to_pylist()
    labels = picked.column("labels").to_pylist()
    width = max(len(x) for x in ids)
    batch_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(zip(ids, labels)):
        batch_ids[i, : len(row_ids)] = torch.tensor(row_ids)
        batch_labels[i, : len(row_labels)] = torch.tensor(row_labels)
        attention[i, : len(row_ids)] = 1
    pixel_values = _pixel_values(picked.column("pixel_values").to_pylist(), image_shape)
    return {"input_ids": batch_ids, "labels": batch_labels, "attention_mask": attention, "pixel_values": pixel_values}


def _pixel_values(records: list[dict], image_shape: tuple[int, int, int]) -> torch.Tensor | None:
    """The rows' stored uint8 crops, in row order, as the float32 pixels the processor would have produced."""
    images = []
    for record in records:
        if record and record["uint8"]:
            crops = np.frombuffer(record["uint8"], dtype=np.uint8).reshape(-1, *image_shape).astype(np.float32)
            scale = np.asarray(record["scale"], dtype=np.float32).reshape(1, -1, 1, 1)
            offset = np.asarray(record["offset"], dtype=np.float32).reshape(1, -1, 1, 1)
            images.append(crops * scale + offset)
    return torch.from_numpy(np.concatenate(images)) if images else None
