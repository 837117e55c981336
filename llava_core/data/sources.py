"""Annotation sources: stream any input file once into arrow blocks of raw rows that Ray Data spreads over workers.

A 1 GB JSON array (`llava_v1_5_mix665k.json`) is parsed incrementally with ijson in one pass and never held whole in
any process; JSONL is read line by line; hub-style parquet is read batch by batch, and its inline image bytes (a
binary column, `{"bytes", "path"}` structs, or lists of them) travel beside the row. Every staged row keeps its index
in its source file, so a reject names its row, and sampling (`first:N`, `last:N`, `random:N`, `25%`) is a choice of
indices made in the driver.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llava_core import storage

STAGED_SCHEMA = pa.schema([
    ("source", pa.string()),  # the annotation file the row came from
    ("image_folder", pa.string()),  # where its relative image paths resolve
    ("index", pa.int64()),  # position of the row in its source file
    ("raw", pa.string()),  # the row as JSON text, exactly as read (a malformed JSONL line stays as it was)
    ("image_bytes", pa.list_(pa.binary())),  # inline images (hub parquet), aligned with the row's images; else []
])
IMAGE_COLUMNS = ("image", "images")
ROWS_PER_BLOCK = 128  # small blocks: the actor pool shares the work evenly down to the last rows
BYTES_PER_BLOCK = 32 << 20  # inline images make rows large: cut blocks by size too


@dataclass
class Source:
    path: str
    image_folder: str = ""
    sampling: str = "all"  # all | first:N | last:N | random:N | N% | first:N% | last:N% | random:N%
    seed: int = 0


def iter_rows(path: str) -> Iterator[tuple[str, list]]:
    """(raw JSON text, inline image bytes) per row of a JSON array, JSONL or parquet file, local or s3://."""
    if path.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    fs, inner = storage.filesystem(path)
    with fs.open_input_stream(inner) as stream:
        head = stream.read(4096).lstrip()
    with fs.open_input_stream(inner) as stream:
        if head.startswith(b"["):
            import ijson

            for row in ijson.items(stream, "item", use_float=True):  # incremental: one row in memory at a time
                yield json.dumps(row, ensure_ascii=False), []
        else:
            for line in io.TextIOWrapper(stream, encoding="utf-8"):
                if line.strip():
                    yield line.strip(), []


def _parquet_rows(path: str) -> Iterator[tuple[str, list]]:
    fs, inner = storage.filesystem(path)
    for batch in pq.ParquetFile(inner, filesystem=fs).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield _split_inline_images(row)


def _split_inline_images(row: dict) -> tuple[str, list]:
    """Hub layout -> (row JSON naming its images, their bytes); an image given only by path keeps its path."""
    column = next((c for c in IMAGE_COLUMNS if row.get(c) is not None), None)
    if column is None:
        return json.dumps(row, ensure_ascii=False, default=str), []
    value = row.pop(column)
    entries = value if isinstance(value, list) else [value]
    names, inline = [], []
    for i, entry in enumerate(entries):
        data, name = entry, None
        if isinstance(entry, dict):
            data, name = entry.get("bytes"), entry.get("path")
        if isinstance(data, str):  # a plain path
            data, name = None, data
        names.append(name or f"inline-{i}")
        inline.append(data)
    row["image"] = names
    return json.dumps(row, ensure_ascii=False, default=str), inline if any(d is not None for d in inline) else []


def staged_blocks(source: Source, rows_per_block: int = ROWS_PER_BLOCK) -> Iterator[pa.Table]:
    """The source's rows as arrow blocks of STAGED_SCHEMA, streamed: one block in memory at a time."""
    buffer, size, count = [], 0, 0

    def block():
        return pa.table([[source.path] * len(buffer), [source.image_folder] * len(buffer), *zip(*buffer)],
                        schema=STAGED_SCHEMA)

    for raw, inline in iter_rows(source.path):
        buffer.append((count, raw, inline))
        size += len(raw) + sum(len(d or b"") for d in inline)
        count += 1
        if len(buffer) >= rows_per_block or size >= BYTES_PER_BLOCK:
            yield block()
            buffer, size = [], 0
    if buffer:
        yield block()


SAMPLING = re.compile(r"^(?:(first|last|end|random):)?(\d+)(%?)$")


def parse_sampling(spec: str) -> tuple[str, int, bool] | None:
    """`all` -> None; else (kind, number, is_percent). A bare `25%` samples 25% at random (seeded)."""
    if spec == "all":
        return None
    match = SAMPLING.match(spec.strip())
    if not match or (match.group(1) is None and not match.group(3)):
        raise ValueError(f"sampling {spec!r}: expected all, first:N, last:N, random:N, N% or first:N% / last:N% / "
                         f"random:N%")
    kind = {"end": "last", None: "random"}.get(match.group(1), match.group(1))
    return kind, int(match.group(2)), bool(match.group(3))


def select_indices(spec: str, total: int, seed: int) -> np.ndarray:
    """Sorted row indices a sampling strategy keeps out of `total` (file order is kept, as LLaVA-NeXT does for
    first/last; random picks are sorted back into file order)."""
    parsed = parse_sampling(spec)
    if parsed is None:
        return np.arange(total)
    kind, number, percent = parsed
    n = min(total, math.ceil(number * total / 100) if percent else number)
    if kind == "first":
        return np.arange(n)
    if kind == "last":
        return np.arange(total - n, total)
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


def keep_indices(block: pa.Table, selected: np.ndarray) -> pa.Table:
    """The rows of a staged block whose index the sampling chose."""
    return block.filter(pa.array(np.isin(block.column("index").to_numpy(), selected)))
