"""From prepared parquet shards to micro-batches, identically planned on every rank.

Each rank reads the (small) per-row columns and computes the same epoch plan from a seeded generator: every rank
runs exactly the same number of steps (unequal counts hang collective ops), and a resumed run continues with exactly
the batches it would have seen. A plan is a list of micro-batches; a micro-batch is a list of rows; a row is the
sample indices it holds (one sample, or several when packing).

Sampling: `random`; `length_grouped` (samples of similar length share a global step, so little padding and no
straggler rank); `modality_grouped` (LLaVA-1.5's `group_by_modality_length`: image and text-only samples in
separate steps, each length-grouped). Packing puts several samples in one row up to `pack_length` tokens
(best-fit decreasing inside shuffled windows), with position ids restarting per sample: transformers then keeps
attention within each sample.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from llava_core.data.templates import IGNORE_INDEX

GROUP_WINDOW_STEPS = 16  # length grouping sorts windows of this many global batches: local order, global shuffle
PACK_WINDOW = 4096  # samples per packing window: big enough to pack tightly, small enough to stay shuffled


@dataclass
class BatchPlan:
    world_size: int
    micro_batch_size: int  # samples per micro-batch; rows per micro-batch when packing
    grad_accum: int
    seed: int
    sampling: str = "random"
    packing: bool = False
    pack_length: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.grad_accum

    @property
    def micro_per_step(self) -> int:
        return self.world_size * self.grad_accum

    def epoch_plan(self, lengths: np.ndarray, num_images: np.ndarray, epoch: int) -> list[list[np.ndarray]]:
        """All micro-batches of `epoch` in order; the last, partial global batch is dropped, as by LLaVA."""
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch])
            if self.packing:
                rows = pack(rng.permutation(len(lengths)), lengths, self.pack_length or int(lengths.max()))
                rows = [rows[i] for i in rng.permutation(len(rows))]
            else:
                rows = [np.array([i]) for i in self.sample_order(lengths, num_images, rng)]
            micro = [rows[i:i + self.micro_batch_size] for i in range(0, len(rows), self.micro_batch_size)]
            micro = micro[: len(micro) // self.micro_per_step * self.micro_per_step]
            if micro and len(micro[-1]) < self.micro_batch_size:
                micro = micro[:-self.micro_per_step]
            self._cache = {epoch: micro}
        return self._cache[epoch]

    def sample_order(self, lengths, num_images, rng) -> np.ndarray:
        order = rng.permutation(len(lengths))
        if self.sampling == "random":
            return order
        if self.sampling == "length_grouped":
            return self.length_grouped(order, lengths, rng)
        with_images = order[num_images[order] > 0]
        text_only = order[num_images[order] == 0]
        steps = self.step_groups(with_images, lengths) + self.step_groups(text_only, lengths)
        full = [s for s in steps if len(s) == self.global_batch_size]
        leftover = np.concatenate([s for s in steps if len(s) < self.global_batch_size] or [np.array([], int)])
        return np.concatenate([full[i] for i in rng.permutation(len(full))] + [leftover]).astype(np.int64)

    def length_grouped(self, order, lengths, rng) -> np.ndarray:
        steps = self.step_groups(order, lengths)
        full = [s for s in steps if len(s) == self.global_batch_size]
        rest = [s for s in steps if len(s) < self.global_batch_size]
        return np.concatenate([full[i] for i in rng.permutation(len(full))] + rest).astype(np.int64)

    def step_groups(self, order: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        """Global batches of similar lengths: sort windows of the shuffled order by length, cut into steps."""
        window = self.global_batch_size * GROUP_WINDOW_STEPS
        steps = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            steps += [chunk[i:i + self.global_batch_size] for i in range(0, len(chunk), self.global_batch_size)]
        return steps

    def steps_in_epoch(self, lengths, num_images, epoch: int) -> int:
        return len(self.epoch_plan(lengths, num_images, epoch)) // self.micro_per_step

    def micro_batches(self, lengths, num_images, epoch: int, step: int, rank: int) -> list[list[np.ndarray]]:
        """This rank's `grad_accum` micro-batches for optimizer step `step` of `epoch`."""
        plan = self.epoch_plan(lengths, num_images, epoch)
        step_micro = plan[step * self.micro_per_step:(step + 1) * self.micro_per_step]
        return [step_micro[k] for k in range(rank, len(step_micro), self.world_size)]

    def rank_micro_batches(self, lengths, num_images, epoch_steps: list[int], start_step: int,
                           rank: int) -> Iterator[list[np.ndarray]]:
        """This rank's micro-batches in training order from global step `start_step` to the end of `epoch_steps`
        (steps per epoch, as the loop runs them): what the prefetcher reads ahead."""
        for step in range(start_step, sum(epoch_steps)):
            epoch, step_in_epoch = epoch_and_step(step, epoch_steps)
            yield from self.micro_batches(lengths, num_images, epoch, step_in_epoch, rank)


def epoch_and_step(step: int, epoch_steps: list[int]) -> tuple[int, int]:
    """(epoch, step within it) of a global step; epochs may differ in length when packing."""
    for epoch, count in enumerate(epoch_steps):
        if step < count:
            return epoch, step
        step -= count
    raise IndexError("step beyond the planned epochs")


def capped_steps(epoch_steps: list[int], max_steps: int) -> list[int]:
    """Steps per epoch when the stage stops after `max_steps` in all: later epochs shrink, then drop out."""
    capped, left = [], max_steps
    for count in epoch_steps:
        if left <= 0:
            break
        capped.append(min(count, left))
        left -= capped[-1]
    return capped


def pack(order: np.ndarray, lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Best-fit decreasing inside windows of the shuffled order: each bin holds samples totalling <= capacity."""
    if lengths.max(initial=0) > capacity:
        raise ValueError(f"a sample of {int(lengths.max())} tokens does not fit pack_length {capacity}; raise "
                         f"pack_length to at least the longest sample (prepare.max_length)")
    bins: list[np.ndarray] = []
    for start in range(0, len(order), PACK_WINDOW):
        window = order[start:start + PACK_WINDOW]
        free: list[tuple[int, int]] = []  # (free tokens, bin id), sorted: bisect finds the tightest fit
        members: list[list[int]] = []
        for i in window[np.argsort(-lengths[window], kind="stable")]:
            need = int(lengths[i])
            at = bisect.bisect_left(free, (need, -1))
            if at < len(free):
                room, b = free.pop(at)
            else:
                room, b = capacity, len(members)
                members.append([])
            members[b].append(int(i))
            if room - need > 0:
                bisect.insort(free, (room - need, b))
        bins += [np.array(m) for m in members]
    return bins


def padding_fraction(plan: list[list[np.ndarray]], lengths: np.ndarray) -> float:
    """Padded share of the tokens the model processes: each micro-batch is padded to its longest row."""
    real = padded = 0
    for micro in plan:
        row_tokens = [int(lengths[row].sum()) for row in micro]
        real += sum(row_tokens)
        padded += max(row_tokens) * len(row_tokens)
    return 1 - real / padded if padded else 0.0


def collate(table: pa.Table, rows: np.ndarray, pad_token_id: int, pixels) -> dict:
    """Right-padded input_ids/labels/attention_mask and the rows' images (and videos) in order (`pixel_values` None
    when there are no images), as `pixels` (`data.image_layouts.CropPixels` / `TilePixels`) makes them from its
    `columns`."""
    picked = table.take(pa.array(rows))
    images = pixels(*(picked.column(name).to_pylist() for name in pixels.columns))
    return {**padded_tokens(picked, pad_token_id), **images}


def padded_tokens(picked: pa.Table, pad_token_id: int) -> dict:
    """Right-padded input_ids/labels/attention_mask of the table's rows, in order."""
    ids, offsets = _flat_lists(picked.column("input_ids"))
    labels, label_offsets = _flat_lists(picked.column("labels"))
    sizes = np.diff(offsets)
    width = int(sizes.max())
    batch_ids = torch.full((len(sizes), width), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(sizes), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(sizes), width), dtype=torch.long)
    for i, n in enumerate(sizes.tolist()):
        batch_ids[i, :n] = ids[offsets[i]:offsets[i + 1]]
        batch_labels[i, :n] = labels[label_offsets[i]:label_offsets[i + 1]]
        attention[i, :n] = 1
    return {"input_ids": batch_ids, "labels": batch_labels, "attention_mask": attention}


def _flat_lists(column: pa.ChunkedArray) -> tuple[torch.Tensor, np.ndarray]:
    """A list<int> column as one flat tensor and its row offsets: no Python int per token (collation runs in the
    prefetch thread, and every Python object it makes holds the GIL the training thread needs)."""
    lists = column.combine_chunks()
    # A copy (one micro-batch of token ids): arrow's zero-copy view is read-only, which torch warns about per batch.
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    start = lists.offsets[0].as_py() if len(lists) else 0
    return torch.from_numpy(values), (lists.offsets.to_numpy() - start)


def collate_packed(table: pa.Table, bins: list[np.ndarray], pad_token_id: int, pixels) -> dict:
    """Packed rows: samples back to back, position ids restarting at 0 for each, no attention_mask (transformers
    builds a block-diagonal causal mask from the restarts). Images follow their samples' order, so each image fills
    its own sample's image tokens. The padding tail is its own unsupervised segment."""
    single = collate(table, np.concatenate(bins), pad_token_id, pixels)  # same rows and image decoding
    sizes = single["attention_mask"].sum(dim=1).tolist()
    width = max(sum(sizes[k] for k in span) for span in spans_of(bins))
    ids = torch.full((len(bins), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for row, span in enumerate(spans_of(bins)):
        at = 0
        for k in span:
            n = sizes[k]
            ids[row, at:at + n] = single["input_ids"][k, :n]
            labels[row, at:at + n] = single["labels"][k, :n]
            labels[row, at] = IGNORE_INDEX  # nothing precedes a sample's first token: never predict it
            positions[row, at:at + n] = torch.arange(n)
            at += n
        positions[row, at:] = torch.arange(width - at)
    images = {k: v for k, v in single.items() if k not in ("input_ids", "labels", "attention_mask")}
    return {"input_ids": ids, "labels": labels, "position_ids": positions, **images}


PAIR_COLUMNS = ["rejected_input_ids", "rejected_labels"]  # a preference row's second sequence (data/rows.py)


def collate_pairs(picked: pa.Table, pad_token_id: int, pixels) -> dict:
    """A micro-batch of n preference pairs as its 2n sequences, the n chosen then the n rejected (the forward runs
    both answers in one batch, as TRL's concatenated forward does). Each pair's images are decoded once and given to
    both of its sequences: the model's image inputs are in row order, so they repeat as the rows do."""
    sequences = pa.table({key: pa.chunked_array(picked.column(key).chunks + picked.column(other).chunks)
                          for key, other in (("input_ids", PAIR_COLUMNS[0]), ("labels", PAIR_COLUMNS[1]))})
    images = pixels(*(picked.column(name).to_pylist() for name in pixels.columns))
    return {**padded_tokens(sequences, pad_token_id),
            **{key: None if value is None else torch.cat([value, value]) for key, value in images.items()}}


def collate_micro_batch(picked: pa.Table, micro: list[np.ndarray], packing: bool, pad_token_id: int, pixels,
                        pairs: bool = False) -> dict:
    """One micro-batch from a table of exactly its samples in plan order (what `streaming.RowReader.take` reads
    for `np.concatenate(micro)`): its rows are renumbered 0..n-1, so collate sees the same samples as before.
    `pairs`: preference rows, collated as their chosen then their rejected sequences (`collate_pairs`)."""
    if pairs:
        return collate_pairs(picked, pad_token_id, pixels)
    if packing:
        return collate_packed(picked, [np.arange(s.start, s.stop) for s in spans_of(micro)], pad_token_id, pixels)
    return collate(picked, np.arange(picked.num_rows), pad_token_id, pixels)


def spans_of(bins: list[np.ndarray]) -> list[range]:
    """Indices into the concatenated samples, one range per packed row."""
    spans, start = [], 0
    for b in bins:
        spans.append(range(start, start + len(b)))
        start += len(b)
    return spans
