"""Token rows written straight to a parquet shard in the prepare stage's layout, for the training tests and the
training benchmarks (benchmarks/train_step.py, train_memory.py): image tokens + text, a quarter of them text-only."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import CLIPVisionConfig

from llava_core.data.rows import ROW_GROUP_ROWS
from llava_core.model.processors import load_tokenizer

ROWS = 96


def write_shard(tiny_dataset, path, rows=ROWS, seed=0):
    """Token rows shaped like the prepare stage's: image tokens + text, a quarter of them text-only."""
    rng = np.random.default_rng(seed)
    image_id = load_tokenizer(tiny_dataset["llm"]).convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig.from_pretrained(tiny_dataset["vision"])
    n_image = (vision.image_size // vision.patch_size) ** 2
    table = {"input_ids": [], "labels": [], "pixel_values": [], "num_images": [], "length": []}
    for i in range(rows):
        text = rng.integers(5, 60, size=int(rng.integers(6, 30))).tolist()
        has_image = i % 4 != 0
        ids = text[:2] + [image_id] * n_image + text[2:] if has_image else text
        labels = [-100] * (len(ids) - 4) + ids[-4:]
        crop = rng.integers(0, 256, (3, vision.image_size, vision.image_size), dtype=np.uint8).tobytes()
        pixels = {"uint8": crop if has_image else b"", "scale": [2 / 255] * 3, "offset": [-1.0] * 3}  # shard layout
        for key, value in (("input_ids", ids), ("labels", labels), ("pixel_values", pixels),
                           ("num_images", int(has_image)), ("length", len(ids))):
            table[key].append(value)
    pq.write_table(pa.table(table), path, row_group_size=ROW_GROUP_ROWS)  # several groups, as prepare writes
    return path


COLOUR_WORDS = ("red", "green", "blue", "yellow")


def write_pair_shard(tiny_dataset, path, rows, offset=0):
    """Preference rows prepared by the prepare stage's own RowPreparer (kind `preference`) from the tiny dataset's
    instruct rows with an image: the first question, its answer chosen and another colour rejected. Returns the
    shard and the raw pairs."""
    import json

    from llava_core.data.rows import OUTPUT_SCHEMA, RowPreparer

    preparer = RowPreparer(tiny_dataset["vision"], tiny_dataset["llm"],
                           {"template": "vicuna_v1", "max_length": 512, "kind": "preference"})
    source = [r for r in json.load(open(tiny_dataset["instruct"])) if "image" in r and "broken" not in r["id"]]
    pairs, prepared = [], []
    for i, row in enumerate(source[offset:offset + rows]):
        question, answer = row["conversations"][0]["value"], row["conversations"][1]["value"]
        wrong = next(c for c in COLOUR_WORDS[i % 4:] + COLOUR_WORDS if c != answer)
        pair = {"id": row["id"], "image": row["image"], "prompt": question, "chosen": answer, "rejected": wrong}
        out = preparer.prepare(pair, tiny_dataset["image_folder"])
        assert out["reason"] == "", out
        pairs.append(pair)
        prepared.append({**out, "source": "pairs", "index": i, "status": "written"})
    table = pa.Table.from_pylist(prepared, schema=OUTPUT_SCHEMA)
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)
    return path, pairs
