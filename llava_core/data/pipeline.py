"""The prepare stage on Ray Data: raw LLaVA rows -> validated, tokenized, label-masked parquet shards.

Per dataset it writes `<out>/<name>/shards/*.parquet` (good rows), `<out>/<name>/rejects.jsonl` (every rejected row
with its reason) and counts in `<out>/manifest.json`, with `rows_in == rows_written + rows_rejected` for every source.
"""
from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import ray

from llava_core import storage
from llava_core.data.formats import read_annotation_rows
from llava_core.data.rows import RowPreparer, RowSettings

log = logging.getLogger(__name__)

SHARD_COLUMNS = ["id", "source", "index", "input_ids", "labels", "pixel_values", "num_images", "length",
                 "num_supervised"]


class TooManyRejects(RuntimeError):
    pass


def prepare_dataset(name: str, source: dict, vision_path: str, llm_path: str, settings: dict, out_dir: str,
                    num_actors: int, rows_per_shard: int) -> tuple[dict, np.ndarray]:
    """Prepare one annotation file; returns its manifest entry and the token length of every written row."""
    raw_rows = read_annotation_rows(source["path"])
    log.info("prepare %s: %d rows from %s", name, len(raw_rows), source["path"])
    items = [{"source": source["path"], "index": i, "raw": json.dumps(row)} for i, row in enumerate(raw_rows)]
    row_settings = RowSettings(template=source["template"], image_folder=source.get("image_folder", ""), **settings)

    prepared = (
        ray.data.from_items(items, override_num_blocks=max(num_actors * 4, 1))
        .map_batches(
            RowPreparer,
            fn_constructor_kwargs={"vision_path": vision_path, "llm_path": llm_path,
                                   "settings": row_settings.__dict__},
            batch_size=32,
            concurrency=num_actors,
            num_cpus=1,
        )
        .materialize()
    )
    dataset_dir = storage.join(out_dir, name)
    storage.delete_dir(dataset_dir)  # a re-run replaces, never appends to, an earlier attempt
    good = prepared.filter(lambda row: row["reason"] == "")
    fs, shard_path = storage.filesystem(storage.join(dataset_dir, "shards"))
    good.select_columns(SHARD_COLUMNS).write_parquet(shard_path, filesystem=fs, min_rows_per_file=rows_per_shard)

    rejects = prepared.filter(lambda row: row["reason"] != "").select_columns(
        ["id", "source", "index", "reason", "detail"]).take_all()
    storage.write_text(storage.join(dataset_dir, "rejects.jsonl"),
                       "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(rejects, key=lambda r: r["index"])))
    lengths = np.asarray(good.select_columns(["length"]).to_pandas()["length"], dtype=np.int64)
    return _manifest_entry(name, source, len(raw_rows), lengths, rejects, good, dataset_dir), lengths


def _manifest_entry(name, source, rows_in, lengths, rejects, good, dataset_dir) -> dict:
    counts = good.select_columns(["num_images", "num_supervised"]).to_pandas()
    entry = {
        "source": source["path"],
        "template": source["template"],
        "rows_in": rows_in,
        "rows_written": int(len(lengths)),
        "rows_rejected": len(rejects),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "text_only_rows": int((counts["num_images"] == 0).sum()),
        "tokens": int(lengths.sum()),
        "supervised_tokens": int(counts["num_supervised"].sum()),
        "max_length": int(lengths.max(initial=0)),
        "shards": storage.list_files(storage.join(dataset_dir, "shards"), ".parquet"),
    }
    assert entry["rows_in"] == entry["rows_written"] + entry["rows_rejected"], entry  # nothing may vanish
    return entry


def check_reject_fraction(manifest: dict, max_fraction: float) -> None:
    for name, entry in manifest["datasets"].items():
        fraction = entry["rows_rejected"] / max(entry["rows_in"], 1)
        if fraction > max_fraction:
            raise TooManyRejects(
                f"dataset {name!r}: {entry['rows_rejected']} of {entry['rows_in']} rows rejected ({fraction:.1%}) "
                f"> prepare.max_reject_fraction {max_fraction:.1%}; reasons {entry['rejected_by_reason']}; "
                f"see {entry['source']} rows listed in rejects.jsonl"
            )


def length_stats(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {}
    q = np.percentile(lengths, [50, 90, 99]).tolist()
    return {"min": int(lengths.min()), "p50": q[0], "p90": q[1], "p99": q[2], "max": int(lengths.max()),
            "mean": float(lengths.mean())}


def run_prepare(workflow, vision_path: str, llm_path: str, out_dir: str) -> dict:
    """The prepare stage: every dataset of the workflow, then the manifest, length statistics and their plot."""
    p = workflow.prepare
    settings = {"max_length": p.max_length, "too_long": p.too_long, "image_aspect_ratio": p.image_aspect_ratio,
                "max_image_pixels": p.max_image_pixels}
    manifest, all_lengths = {"datasets": {}}, {}
    for name, source in workflow.datasets.items():
        entry, lengths = prepare_dataset(name, source.__dict__, vision_path, llm_path, settings, out_dir,
                                         p.num_actors, p.rows_per_shard)
        manifest["datasets"][name] = entry
        all_lengths[name] = lengths
    storage.write_json(storage.join(out_dir, "manifest.json"), manifest)
    storage.write_json(storage.join(out_dir, "stats.json"),
                       {name: length_stats(lengths) for name, lengths in all_lengths.items()})
    storage.write_bytes(storage.join(out_dir, "lengths.png"), plot_lengths(all_lengths))
    check_reject_fraction(manifest, p.max_reject_fraction)
    return {name: {k: e[k] for k in ("rows_in", "rows_written", "rows_rejected", "tokens")}
            for name, e in manifest["datasets"].items()}


def plot_lengths(all_lengths: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, lengths in all_lengths.items():
        ax.hist(lengths, bins=40, alpha=0.6, label=f"{name} ({len(lengths)} rows)")
    ax.set_xlabel("tokens per sample (image tokens included)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
