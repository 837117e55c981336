"""Training rows stream from local shards: the prefetched micro-batches are exactly the ones collated from the whole
table in memory (several shards and row groups, packed or not, from the start or a resumed step), the reader stays
at most `depth` batches ahead, and a shard that cannot be read fails the consumer naming the file. Prepare's plan
index gives exactly the rows the footer scan gives, and one that does not fit its shards fails. From S3:
tests/integration/test_streaming.py."""
import gc
import os
import re
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from llava_core.data.plan_index import PlanIndexError, write_plan_index
from llava_core.train.streaming import BatchPrefetcher, RowReader, ShardReadError, TrainingRows
from tests.streaming_helpers import (
    GROUP_ROWS,
    PIXELS,
    SHARD_ROWS,
    assert_same,
    assert_same_rows,
    expected_batches,
    in_memory,
    plan_for,
    shard_table,
    streamed,
)


def test_the_index_covers_every_row_of_every_group(shards):
    rows = TrainingRows.open(shards)
    assert rows.num_rows == sum(SHARD_ROWS)
    assert len(rows.group_starts) == sum(-(-n // GROUP_ROWS) for n in SHARD_ROWS) == 17
    table = in_memory(shards)
    np.testing.assert_array_equal(rows.lengths, table.column("length").to_numpy())
    groups, within = rows.locate(np.array([0, 20, 21, 36, 37, 63]))
    assert [int(rows.group_shard[g]) for g in groups] == [0, 0, 1, 1, 2, 2]
    assert [int(rows.group_in_shard[g]) for g in groups] == [0, 5, 0, 3, 0, 6]
    assert within.tolist() == [0, 0, 0, 3, 0, 2]

    wanted = np.array([63, 0, 37, 20, 21, 5, 62])  # across shards and back: one open file at a time
    reader = RowReader(rows, columns=["input_ids", "pixel_values"], cache_bytes=0, open_shards=1)
    assert reader.take(wanted).to_pylist() == table.select(["input_ids", "pixel_values"]).take(wanted).to_pylist()
    assert len(reader.footers) == 1 and reader.group_reads == 6  # 62 and 63 share a group


def test_the_cache_keeps_recent_groups_within_its_bytes_and_counts_them_as_they_come_and_go(shards):
    rows = TrainingRows.open(shards)
    table = in_memory(shards).select(["input_ids", "pixel_values"])
    one_group = RowReader(rows, columns=["input_ids", "pixel_values"]).groups([0])[0].nbytes
    reader = RowReader(rows, columns=["input_ids", "pixel_values"], cache_bytes=3 * one_group)
    order = np.random.default_rng(0).permutation(rows.num_rows)
    for start in range(0, len(order), 5):
        wanted = order[start:start + 5]
        assert reader.take(wanted).to_pylist() == table.take(wanted).to_pylist()
        assert reader.cached_bytes == sum(t.nbytes for t in reader.cache.values())
        needed = len(set(rows.locate(wanted)[0].tolist()))
        # over the budget only by what this call needs: the groups it just read are never dropped
        assert reader.cached_bytes <= 3 * one_group or len(reader.cache) == needed
    assert reader.group_reads > len(rows.group_starts)  # groups were dropped and read again


def footer_scan(paths) -> TrainingRows:
    """The footer scan as it was before the plan index, written out here: what the index must reproduce."""
    lengths, images, counts = [], [], []
    for path in paths:
        shard = pq.ParquetFile(path)
        counts.append([shard.metadata.row_group(g).num_rows for g in range(shard.metadata.num_row_groups)])
        small = shard.read(columns=["length", "num_images"])
        lengths.append(small.column("length").to_numpy().astype(np.int64))
        images.append(small.column("num_images").to_numpy().astype(np.int64))
    sizes = np.concatenate([np.asarray(c, dtype=np.int64) for c in counts])
    return TrainingRows(list(paths), np.array([sum(c) for c in counts]), np.concatenate(lengths),
                        np.concatenate(images), group_starts=np.concatenate([[0], np.cumsum(sizes)[:-1]]),
                        group_shard=np.repeat(np.arange(len(counts)), [len(c) for c in counts]),
                        group_in_shard=np.concatenate([np.arange(len(c)) for c in counts]))


def test_the_plan_index_gives_exactly_the_footer_scan(shards, tmp_path):
    index = str(tmp_path / "plan_index.parquet")
    assert write_plan_index(shards, index) == sum(SHARD_ROWS)
    from_index = TrainingRows.open(shards, index)
    assert_same_rows(from_index, footer_scan(shards))
    assert_same_rows(TrainingRows.open(shards), from_index)  # the fallback for datasets prepared without one
    assert pq.read_metadata(index).num_rows == sum(SHARD_ROWS)

    with pytest.raises(PlanIndexError, match="names 3 shards, the manifest 2"):
        TrainingRows.open(shards[:2], index)
    with pytest.raises(PlanIndexError, match="other files or order"):
        TrainingRows.open(shards[::-1], index)

    # A shard rewritten after the index: the reader finds out from the footer it reads anyway, naming the file.
    pq.write_table(shard_table(SHARD_ROWS[1] - 1, seed=1), shards[1], row_group_size=GROUP_ROWS)
    with pytest.raises(ShardReadError, match=re.escape(f"{shards[1]} holds 15 rows, the plan index 16")):
        RowReader(from_index).take(np.array([SHARD_ROWS[0]]))


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("resumed", [False, True])
def test_prefetched_batches_equal_collating_from_memory(shards, packing, resumed):
    rows, table = TrainingRows.open(shards), in_memory(shards)
    plan, epoch_steps = plan_for(rows, packing)
    assert len(epoch_steps) == 2 and epoch_steps[0] >= 4
    start_step = epoch_steps[0] // 2 + 1 if resumed else 0  # a resume inside epoch 0, running on into epoch 1
    for rank in range(2):
        want = expected_batches(table, plan, epoch_steps, start_step, rank, packing)
        got = streamed(rows, plan, epoch_steps, start_step, rank, packing)
        assert len(got) == len(want) == (sum(epoch_steps) - start_step) * plan.grad_accum
        for g, w in zip(got, want):
            assert_same(g, w)
    assert any(w["pixel_values"] is None for w in want) or packing  # text-only batches stream too


def test_the_reader_stays_at_most_depth_batches_ahead_and_stops_on_close(shards):
    rows = TrainingRows.open(shards)
    plan, epoch_steps = plan_for(rows, packing=False)
    pulled = []

    def counted():
        for micro in plan.rank_micro_batches(rows.lengths, rows.num_images, epoch_steps, 0, 0):
            pulled.append(micro)
            yield micro

    depth = 2
    batches = BatchPrefetcher(rows, counted(), False, 0, PIXELS, depth=depth)
    deadline = time.time() + 10
    while not batches.ready.full() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # time enough to run further ahead, if it could
    assert batches.ready.qsize() == depth
    assert len(pulled) == depth + 1  # `depth` ready, one built and waiting for room
    first = batches.get()
    assert first.micro is pulled[0]
    time.sleep(0.3)
    assert len(pulled) == depth + 2  # one taken, one more read
    batches.close()
    assert not batches.thread.is_alive()
    assert len(pulled) < sum(epoch_steps) * plan.grad_accum

    # A loop that raises never calls close: dropping the prefetcher stops its thread all the same.
    stream = plan.rank_micro_batches(rows.lengths, rows.num_images, epoch_steps, 0, 0)
    thread = BatchPrefetcher(rows, stream, False, 0, PIXELS, depth=1).thread
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_shard_that_cannot_be_read_fails_the_consumer_naming_the_file(shards):
    rows = TrainingRows.open(shards)
    os.remove(shards[1])  # gone after the plan was made: the reader meets it when a batch needs its rows
    plan, epoch_steps = plan_for(rows, packing=False)
    stream = plan.rank_micro_batches(rows.lengths, rows.num_images, epoch_steps, 0, 0)
    with BatchPrefetcher(rows, stream, False, 0, PIXELS) as batches:
        with pytest.raises(ShardReadError, match=re.escape(shards[1])):
            for _ in batches:
                pass
        with pytest.raises(ShardReadError):  # and stays failed
            batches.get()
    assert not batches.thread.is_alive()
