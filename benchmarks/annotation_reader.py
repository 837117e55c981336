"""Annotation reader throughput: rows/s of the prepare stage's JSON array reader against the ijson one it replaced.

Writes (or reuses, under --cache-dir) a JSON array of about --mb MB in LLaVA-665K's row shape (`id`, `image`, a
multi-turn `conversations` of `from`/`value` turns, ~1.5 KB a row, a few non-ASCII characters), then times, on one
core, each reader streaming every row as the JSON text that is staged:

- ijson: `ijson.items(stream, "item")` (its C backend, yajl2_c) and `json.dumps` per row, as `sources.py` did;
- reader: `sources.iter_rows` (chunked UTF-8 decode, `raw_decode` per element, the per-row defect checks).

Last line: {"rows", "mb", "indent", "ijson_rows_per_s", "reader_rows_per_s", "ratio"}. ijson is in the `bench`
extra (`pip install -e '.[bench]'`; `dev` includes it): the prepare stage no longer uses it.

    PYTHONPATH=. python benchmarks/annotation_reader.py [--mb 100] [--indent 2] [--smoke]

--smoke: a 0.25 MB array read once (benchmarks/harness.py), a second.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import harness
import ijson

from llava_core.data.sources import iter_rows  # imported here: its import is not the reader's time

WORDS = ("the a bus red white is in of image picture man woman standing street two people table dog cat on near "
         "left right what colour how many sitting holding café naïve").split()


def llava_row(i: int, rng: random.Random) -> dict:
    turns = []
    for t in range(rng.randint(1, 6)):
        question = " ".join(rng.choices(WORDS, k=rng.randint(6, 16))) + "?"
        answer = " ".join(rng.choices(WORDS, k=rng.randint(8, 60))) + "."
        turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + question},
                  {"from": "gpt", "value": answer}]
    return {"id": f"{i:012d}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": turns}


def write_array(path: str, megabytes: float, indent: int | None) -> int:
    rng, rows, size = random.Random(0), [], 0
    while size < megabytes * 2**20:
        rows.append(llava_row(len(rows), rng))
        size += len(json.dumps(rows[-1])) + 2
    with open(path, "w") as f:
        json.dump(rows, f, indent=indent, ensure_ascii=False)
    return len(rows)


def ijson_rows(path: str) -> int:
    count = 0
    with open(path, "rb") as stream:
        for row in ijson.items(stream, "item", use_float=True):
            json.dumps(row, ensure_ascii=False)
            count += 1
    return count


def reader_rows(path: str) -> int:
    count = 0
    for row in iter_rows(path):
        assert row.defect is None, row.defect
        count += 1
    return count


def timed(read, path: str, repeats: int) -> tuple[int, float]:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        count = read(path)
        best = min(best, time.perf_counter() - start)
    return count, best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--indent", type=int, default=None, help="pretty-print the array (default: compact)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (a shared machine drifts)")
    parser.add_argument("--cache-dir", default=tempfile.gettempdir())
    args = harness.parse_args(parser, smoke={"mb": 0.25, "repeats": 1})
    path = os.path.join(args.cache_dir, f"llava_rows_{args.mb:g}mb_indent{args.indent}.json")
    if not os.path.exists(path):
        write_array(path, args.mb, args.indent)
    rows, ijson_s = timed(ijson_rows, path, args.repeats)
    reader_count, reader_s = timed(reader_rows, path, args.repeats)
    assert reader_count == rows, (reader_count, rows)
    harness.print_summary({"rows": rows, "mb": round(os.path.getsize(path) / 2**20, 2), "indent": args.indent,
                           "ijson_rows_per_s": round(rows / ijson_s), "reader_rows_per_s": round(rows / reader_s),
                           "ratio": round(ijson_s / reader_s, 2)})


if __name__ == "__main__":
    main()
