"""The plan index of a prepared dataset: where every written row lives and the two columns the batch plan needs.

For every row of the shards, in global order (shards in list order, rows in file order): `shard` (its number in
the list), `row_group`, `row` (within the group), `length` and `num_images`; the schema metadata holds the shard
paths and each shard's row count. Prepare builds it once (`write_plan_index`, in a Ray task); every training rank
then reads this one file (~5 MB for LLaVA-1.5's 665K rows) instead of every shard's footer plus one range per row
group (~83K requests on S3, per rank). `scan_shards` is that footer scan: it builds the index and is the fallback
for datasets prepared before the index existed.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llava_core import storage

INDEX_NAME = "plan_index.parquet"
PLAN_COLUMNS = ["length", "num_images"]
INDEX_SCHEMA = pa.schema([("shard", pa.int32()), ("row_group", pa.int32()), ("row", pa.int32()),
                          ("length", pa.int32()), ("num_images", pa.int32())])
# Concurrent shard reads while building the index: the scan is request latency, not bandwidth (~20 ms per small
# range on S3), and the AWS SDK's default pool holds 25 connections per client.
SCAN_THREADS = 16


class PlanIndexError(ValueError):
    """The plan index does not describe the shards it is used with."""


def scan_shards(shard_paths: list[str], threads: int = SCAN_THREADS) -> pa.Table:
    """The plan index from the shards themselves: each footer and the two small columns, `threads` shards at once."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        parts = list(pool.map(_scan_shard, range(len(shard_paths)), shard_paths))
    table = pa.concat_tables(parts) if parts else INDEX_SCHEMA.empty_table()
    return table.replace_schema_metadata(_metadata(shard_paths, [p.num_rows for p in parts]))


def _scan_shard(k: int, path: str) -> pa.Table:
    fs, inner = storage.filesystem(path)
    # pre_buffer: the two adjacent small columns of a row group come in one coalesced range
    with pq.ParquetFile(fs.open_input_file(inner), pre_buffer=True) as shard:
        small = shard.read(columns=PLAN_COLUMNS)
        sizes = np.array([shard.metadata.row_group(g).num_rows for g in range(shard.metadata.num_row_groups)],
                         dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    return pa.table({"shard": np.full(small.num_rows, k, dtype=np.int32),
                     "row_group": np.repeat(np.arange(len(sizes)), sizes).astype(np.int32),
                     "row": (np.arange(small.num_rows) - np.repeat(starts, sizes)).astype(np.int32),
                     "length": small.column("length").cast(pa.int32()),
                     "num_images": small.column("num_images").cast(pa.int32())}, schema=INDEX_SCHEMA)


def _metadata(shard_paths: list[str], shard_rows: list[int]) -> dict:
    return {"shards": json.dumps(list(shard_paths)), "shard_rows": json.dumps([int(n) for n in shard_rows])}


def write_plan_index(shard_paths: list[str], path: str) -> int:
    """Scan the shards and write their index to `path`; returns its row count (prepare's Ray task)."""
    table = scan_shards(shard_paths)
    sink = pa.BufferOutputStream()  # ~20 bytes a row: ~13 MB for 665K rows
    pq.write_table(table, sink)
    storage.write_bytes(path, sink.getvalue().to_pybytes())  # its directory made first, on whichever node this runs
    return table.num_rows


def read_plan_index(path: str, shard_paths: list[str]) -> pa.Table:
    """The index at `path`, checked against the shards the caller (the manifest) names: same shards in the same
    order, and as many rows as its per-shard counts say. Each shard's own count is checked when a rank opens it."""
    fs, inner = storage.filesystem(path)
    table = pq.read_table(inner, filesystem=fs)
    meta = table.schema.metadata or {}
    if b"shards" not in meta or b"shard_rows" not in meta:
        raise PlanIndexError(f"plan index {path}: no shard list in its metadata; re-run prepare")
    named, counts = json.loads(meta[b"shards"]), json.loads(meta[b"shard_rows"])
    if named != list(shard_paths):
        raise PlanIndexError(f"plan index {path} names {len(named)} shards, the manifest {len(shard_paths)}"
                             f"{'' if len(named) != len(shard_paths) else ' (other files or order)'}: it belongs to "
                             f"another prepare; re-run prepare")
    if sum(counts) != table.num_rows or len(counts) != len(named):
        raise PlanIndexError(f"plan index {path}: {table.num_rows} rows, but its shards hold {sum(counts)}")
    return table


def shard_rows(index: pa.Table) -> list[int]:
    """Each shard's row count, as the index recorded it."""
    return json.loads(index.schema.metadata[b"shard_rows"])
