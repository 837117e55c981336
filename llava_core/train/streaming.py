"""A rank's training rows, read from the prepared shards a few micro-batches ahead, never the whole dataset.

`TrainingRows` is what every rank holds: the small per-row columns the batch plan needs (`length`, `num_images`)
and where each global row lives (shard, row group, row within it), from prepare's plan index (one file) or, for
datasets prepared before it, from the parquet footers. `RowReader` reads the
row groups holding a set of rows (local or `s3://`, only the columns collate needs) through a small byte-bounded
LRU. `BatchPrefetcher` walks this rank's micro-batches in a background thread, collates them and keeps at most
`depth` ready CPU batches in a queue; the training loop takes them in order and sees how long it waited.

Memory per rank is the index (~19 bytes a row), the buffer (`depth` collated micro-batches) and the LRU, whatever
the dataset's size. A random row costs its whole row group: prepare writes small ones (`rows.ROW_GROUP_ROWS`).
"""
from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llava_core import storage
from llava_core.data.plan_index import PlanIndexError, read_plan_index, scan_shards, shard_rows
from llava_core.train.batching import PAIR_COLUMNS, collate_micro_batch

BATCH_COLUMNS = ["input_ids", "labels", "pixel_values"]  # what collate reads, with crops (else: `pixels.columns`)
CACHE_BYTES = 64 * 2**20  # recently read row groups: rows of one group that meet in nearby micro-batches
OPEN_SHARDS = 16  # decoded footers kept for the next read (~3 MB each for 2000 rows)
# Row groups of one micro-batch read at once: on S3 a read is a request round trip (~30-80 ms), so the 16 random
# rows of a 7B micro-batch read one after another would take about a second, close to a whole step.
READ_THREADS = 8
PREFETCH_DEPTH = 8  # ready micro-batches per rank: ~175 MB for 16 images of 336 px in float32 each


class ShardReadError(OSError):
    """A shard could not be read; the message names the file (the reader thread's error, raised in the loop)."""


@dataclass
class TrainingRows:
    """Every prepared row's plan columns and location; global row i is the i-th row of the shards in list order.
    Footers are not kept: decoded, one of a 2000-row shard in 8-row groups takes ~3 MB (1.5 KB a row)."""
    shards: list[str]
    shard_rows: np.ndarray  # each shard's row count: checked against its footer when a reader opens it
    lengths: np.ndarray
    num_images: np.ndarray
    group_starts: np.ndarray  # global index of each row group's first row, over all shards' groups in order
    group_shard: np.ndarray  # the shard of each row group
    group_in_shard: np.ndarray  # the row group's index inside its shard

    @classmethod
    def open(cls, shard_paths: list[str], plan_index: str | None = None) -> TrainingRows:
        """From prepare's plan index (one read) when there is one, else from the shards' footers and two small
        columns (datasets prepared before the index: every footer and one range per row group, serially, as each
        rank of a node does it at once). No pixel or token bytes are read."""
        if not shard_paths:
            raise ValueError("no prepared shards to train on: did the prepare stage write any rows?")
        if plan_index:
            return cls.from_index(shard_paths, read_plan_index(plan_index, shard_paths))
        return cls.from_index(shard_paths, scan_shards(shard_paths, threads=1))

    @classmethod
    def from_index(cls, shard_paths: list[str], index: pa.Table) -> TrainingRows:
        """The plan index's rows (see `llava_core.data.plan_index`) as row groups and plan columns."""
        shard, group = (index.column(c).to_numpy().astype(np.int64) for c in ("shard", "row_group"))
        starts_group = np.ones(len(shard), dtype=bool)
        starts_group[1:] = (shard[1:] != shard[:-1]) | (group[1:] != group[:-1])
        first = np.flatnonzero(starts_group)
        within = np.arange(len(shard)) - first[np.cumsum(starts_group) - 1]
        if not np.array_equal(index.column("row").to_numpy(), within):
            raise PlanIndexError("plan index: the rows of a row group are not numbered 0, 1, ... in order; "
                                 "re-run prepare")
        return cls(list(shard_paths), np.asarray(shard_rows(index), dtype=np.int64),
                   index.column("length").to_numpy().astype(np.int64),
                   index.column("num_images").to_numpy().astype(np.int64),
                   group_starts=first, group_shard=shard[first], group_in_shard=group[first])

    @property
    def num_rows(self) -> int:
        return len(self.lengths)

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row group, row within it) of each global row."""
        groups = np.searchsorted(self.group_starts, rows, side="right") - 1
        return groups, rows - self.group_starts[groups]


class RowReader:
    """Reads rows by global index, a row group at a time, keeping recent groups up to `cache_bytes` and the last
    `open_shards` shards' footers (reading one again costs a request on S3, ~0.4 MB and ~10 ms to decode).
    Called from one thread; the row groups a call needs are read by up to `READ_THREADS` at once."""

    def __init__(self, rows: TrainingRows, columns: list[str] = BATCH_COLUMNS, cache_bytes: int = CACHE_BYTES,
                 open_shards: int = OPEN_SHARDS):
        self.rows, self.columns, self.cache_bytes, self.open_shards = rows, columns, cache_bytes, open_shards
        self.footers: collections.OrderedDict[int, pq.FileMetaData] = collections.OrderedDict()
        self.cache: collections.OrderedDict[int, pa.Table] = collections.OrderedDict()
        # kept as groups come and go: summing `nbytes` over a cache of ~650 small groups took ~9 ms a micro-batch,
        # holding the GIL the training thread needs between its ops
        self.cached_bytes = 0
        self.group_reads = 0
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def take(self, rows: np.ndarray) -> pa.Table:
        """The `columns` of `rows`, in the order given."""
        groups, within = self.rows.locate(np.asarray(rows, dtype=np.int64))
        needed = list(dict.fromkeys(groups.tolist()))
        tables = self.groups(needed)
        first = dict(zip(needed, np.cumsum([0] + [tables[g].num_rows for g in needed[:-1]])))
        index = np.array([first[g] + r for g, r in zip(groups.tolist(), within.tolist())], dtype=np.int64)
        # permissive: a shard whose writer widened `binary` to `large_binary` (past 2 GiB per file) still joins
        return pa.concat_tables([tables[g] for g in needed], promote_options="permissive").take(pa.array(index))

    def groups(self, needed: list[int]) -> dict[int, pa.Table]:
        """The row groups `needed`, from the LRU or read concurrently (each read on its own file handle)."""
        missing = [g for g in needed if g not in self.cache]
        sources = [(g, self.footer(int(self.rows.group_shard[g]))) for g in missing]  # footers: in this thread
        if len(sources) > 1:
            if self.pool is None:
                self.pool = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="row-groups")
            read = list(self.pool.map(lambda source: self.read_group(*source), sources))
        else:
            read = [self.read_group(*source) for source in sources]
        self.group_reads += len(read)
        for g, table in zip(missing, read):
            self.cache[g] = table
            self.cached_bytes += table.nbytes
        tables = {g: self.cache[g] for g in needed}
        for g in needed:
            self.cache.move_to_end(g)
        while self.cached_bytes > self.cache_bytes and len(self.cache) > len(needed):
            self.cached_bytes -= self.cache.popitem(last=False)[1].nbytes
        return tables

    def read_group(self, g: int, metadata: pq.FileMetaData) -> pa.Table:
        """One row group, on a handle of its own (given the shard's footer, so nothing is read twice): safe to call
        from several threads at once."""
        shard = int(self.rows.group_shard[g])
        path = self.rows.shards[shard]
        try:
            with _open_shard(path, metadata) as file:
                return file.read_row_group(int(self.rows.group_in_shard[g]), columns=self.columns)
        except Exception as error:
            raise ShardReadError(f"reading row group {int(self.rows.group_in_shard[g])} of training shard "
                                 f"{path}: {error}") from error

    def footer(self, k: int) -> pq.FileMetaData:
        if k in self.footers:
            self.footers.move_to_end(k)
        else:
            try:
                with _open_shard(self.rows.shards[k]) as shard:
                    self.footers[k] = shard.metadata
            except Exception as error:
                raise ShardReadError(f"reading the footer of training shard {self.rows.shards[k]}: {error}") from error
            self.check_rows(k)
            if len(self.footers) > self.open_shards:
                self.footers.popitem(last=False)
        return self.footers[k]

    def check_rows(self, k: int) -> None:
        """The index's row count of shard k against its footer (read anyway): a shard rewritten after the index was
        built would otherwise hand out other rows than the plan's."""
        found, expected = self.footers[k].num_rows, int(self.rows.shard_rows[k])
        if found != expected:
            raise ShardReadError(f"training shard {self.rows.shards[k]} holds {found} rows, the plan index "
                                 f"{expected}: the shard changed after prepare; re-run prepare")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        self.footers.clear()


def _open_shard(path: str, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    # pre_buffer: a row group's columns are fetched in coalesced ranges (one request on S3, not one per column).
    fs, inner = storage.filesystem(path)
    return pq.ParquetFile(fs.open_input_file(inner), metadata=metadata, pre_buffer=True)


class ReadyBatch(NamedTuple):
    micro: list[np.ndarray]  # the plan's rows (sample indices) of this micro-batch
    batch: dict  # collated CPU tensors
    wait_s: float  # how long the consumer blocked for it


_END = object()


class BatchPrefetcher:
    """Collates `micro_batches` in a daemon thread into a queue of at most `depth` ready batches (plus the one it is
    building); `get` returns them in order. An error in the thread is raised by the next `get`. `close` (or leaving
    a `with` block) stops the thread; if the owner is dropped without closing (the loop raised), the thread stops
    too, as it holds no reference to its owner."""

    def __init__(self, rows: TrainingRows, micro_batches: Iterator[list[np.ndarray]], packing: bool,
                 pad_token_id: int, pixels, depth: int = PREFETCH_DEPTH,
                 cache_bytes: int = CACHE_BYTES, pairs: bool = False):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, not {depth}")
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        columns = ["input_ids", "labels", *(PAIR_COLUMNS if pairs else []), *pixels.columns]
        self.reader = RowReader(rows, columns, cache_bytes=cache_bytes)
        args = (self.reader, micro_batches, packing, pad_token_id, pixels, pairs, self.ready, self.stop)
        self.thread = threading.Thread(target=_produce, args=args, name="batch-prefetcher", daemon=True)
        self.thread.start()
        weakref.finalize(self, self.stop.set)

    def get(self) -> ReadyBatch:
        started = time.perf_counter()
        while True:
            try:
                item = self.ready.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the batch prefetcher stopped without finishing its micro-batches") from None
        if item is _END:
            self.ready.put(_END)  # every later get ends too
            raise StopIteration("no micro-batches left in the plan")
        if isinstance(item, BaseException):
            self.ready.put(item)
            raise item
        micro, batch = item
        return ReadyBatch(micro, batch, time.perf_counter() - started)

    def __iter__(self):
        while True:
            try:
                yield self.get()
            except StopIteration:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.reader.close()

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _produce(reader: RowReader, micro_batches, packing, pad_token_id, pixels, pairs: bool, ready: queue.Queue,
             stop: threading.Event) -> None:
    """The reader thread: read, collate, enqueue; the end or the first error is enqueued too."""
    try:
        for micro in micro_batches:
            picked = reader.take(np.concatenate(micro))
            batch = collate_micro_batch(picked, micro, packing, pad_token_id, pixels, pairs)
            if not _put(ready, (micro, batch), stop):
                return
        _put(ready, _END, stop)
    except BaseException as error:  # noqa: BLE001 - every failure must reach the loop, not die with the thread
        _put(ready, error, stop)


def _put(ready: queue.Queue, item, stop: threading.Event) -> bool:
    """Block while the buffer is full, waking up to notice `stop`; False when stopped."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
