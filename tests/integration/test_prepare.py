"""The prepare stage on Ray Data: every good row written once, every bad row rejected with its reason."""
import json
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import torch

from llava_core.config import SourceSettings
from llava_core.data import pipeline
from llava_core.data.image_layouts import CropPixels
from tests.prepare_helpers import ROW_SETTINGS, expand2square, expected_rejects, png, prepare, turns


def test_dirty_dataset_rejects_exactly_the_bad_rows(ray_session, tiny_dataset, dirty_dataset, tmp_path, monkeypatch,
                                                    caplog):
    monkeypatch.setattr(pipeline, "ROW_GROUP_ROWS", 2)  # 7 rows: several row groups, as a real dataset has
    caplog.set_level(logging.INFO, logger="llava_core")
    entry, lengths = prepare(dirty_dataset, tiny_dataset, tmp_path)
    # the driver's progress line: every row, prepared and written, of every row the sources hold
    finished = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[prepare mix] row 18/18 (100%)")]
    assert len(finished) == 1 and " elapsed " in finished[0] and finished[0].endswith(" ETA 0:00:00"), finished
    footers = [pq.ParquetFile(p).metadata for p in entry["shards"]]
    group_rows = [f.row_group(g).num_rows for f in footers for g in range(f.num_row_groups)]
    assert max(group_rows) <= 2 and sum(group_rows) == 7  # small row groups: a random row reads little
    rejects = [json.loads(line) for line in open(tmp_path / "mix" / "rejects.jsonl")]
    assert {r["id"]: r["reason"] for r in rejects} == expected_rejects(dirty_dataset)
    assert all(r["source"] == dirty_dataset["path"] for r in rejects)
    assert [r["index"] for r in rejects] == list(range(7, 18))  # the bad rows follow the 7 good ones in the file
    assert entry["rows_in"] == 18 and entry["rows_written"] == 7 and entry["rows_rejected"] == 11
    assert entry["rejected_by_reason"] == {k: 1 for k in dirty_dataset["bad"]}
    assert entry["text_only_rows"] == 2
    assert entry["sources"][dirty_dataset["path"]]["rows_in"] == 18

    table = pq.read_table([p for p in entry["shards"]])
    assert sorted(table.column("id").to_pylist()) == sorted(dirty_dataset["good"])  # each good row exactly once
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert by_id["multi-image"]["num_images"] == 2 and by_id["multi-image"]["modality"] == "image"
    assert len(by_id["multi-image"]["pixel_values"]["uint8"]) == 2 * 3 * 64 * 64  # uint8 crops, not float32
    assert by_id["text-only"]["pixel_values"]["uint8"] == b"" and by_id["text-only"]["modality"] == "text"
    image_row = by_id["image-row"]
    assert image_row["length"] == len(image_row["input_ids"]) == len(image_row["labels"])
    assert sorted(lengths.tolist()) == sorted(r["length"] for r in by_id.values())
    assert entry["longest_row"] == max(r["length"] for r in by_id.values())  # what the plan sizes memory for

    # What the trainer reads: collate turns the stored crops into the processor's own float32 pixels.
    from transformers import AutoImageProcessor

    from llava_core.data.images import decode_image
    from llava_core.train.batching import collate
    from llava_core.train.streaming import RowReader, TrainingRows
    # Prepare's plan index (written by a Ray task, named in the manifest entry) is what the footer scan finds.
    assert entry["plan_index"] == str(tmp_path / "mix" / "plan_index.parquet")
    examples = RowReader(TrainingRows.open(entry["shards"], entry["plan_index"]))
    scanned = TrainingRows.open(entry["shards"])
    for field in ("shard_rows", "lengths", "num_images", "group_starts", "group_shard", "group_in_shard"):
        np.testing.assert_array_equal(getattr(examples.rows, field), getattr(scanned, field), err_msg=field)
    assert len(examples.rows.group_starts) == len(group_rows) > 1
    ids = examples.take(np.arange(examples.rows.num_rows)).column("input_ids").to_pylist()
    row = next(i for i, x in enumerate(ids) if x == by_id["multi-image"]["input_ids"])
    batch = collate(examples.take(np.array([row])), np.array([0]), pad_token_id=0, pixels=CropPixels((3, 64, 64)))
    processor = AutoImageProcessor.from_pretrained(tiny_dataset["vision"])
    originals = [decode_image(open(os.path.join(dirty_dataset["image_folder"], n), "rb").read())
                 for n in ("good.png", "second.png")]
    fill = tuple(int(c * 255) for c in processor.image_mean)
    expected = processor(images=[expand2square(im, fill) for im in originals], return_tensors="np")["pixel_values"]
    assert batch["pixel_values"].dtype == torch.float32 and tuple(batch["pixel_values"].shape) == (2, 3, 64, 64)
    np.testing.assert_allclose(batch["pixel_values"].numpy(), expected, atol=1e-5)


def test_mixture_of_jsonl_and_hub_parquet_with_sampling(ray_session, tiny_dataset, dirty_dataset, tmp_path):
    """Two sources in one dataset: JSONL read from an image folder (last 3 rows), and hub-layout parquet with the
    image bytes inline (struct {bytes, path}, a plain binary list, or none) sampled at random."""
    import pyarrow as pa

    folder = dirty_dataset["image_folder"]
    jsonl = tmp_path / "rows.jsonl"
    rows = [{"id": f"j{i}", "image": "good.png", "conversations": turns()} for i in range(5)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]) + "{not json\n" + json.dumps(rows[4]) + "\n")
    conversations = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "blue"}]
    hub = pa.table({
        "id": [f"h{i}" for i in range(8)],
        "image": [{"bytes": png(colour=(20, 20, 200)), "path": f"h{i}.png"} if i % 2 else None for i in range(8)],
        "conversations": [conversations if i % 2 else turns("Say hi.", "hi") for i in range(8)],
    })
    pq.write_table(hub, tmp_path / "hub.parquet")
    sources = [SourceSettings(str(jsonl), folder, "last:3"),
               SourceSettings(str(tmp_path / "hub.parquet"), "", "50%", seed=3)]
    entry, _ = pipeline.prepare_dataset("mix", sources, tiny_dataset["vision"], tiny_dataset["llm"], ROW_SETTINGS,
                                        str(tmp_path / "out"))
    per_source = entry["sources"]
    assert per_source[str(jsonl)]["rows_in"] == 3 and per_source[str(jsonl)]["rows_rejected"] == 1
    assert per_source[str(jsonl)]["rejected_by_reason"] == {"malformed_row": 1}  # the "{not json" line
    hub_source = per_source[str(tmp_path / "hub.parquet")]
    assert hub_source["rows_in"] == 4 and hub_source["rows_written"] == 4
    assert all(s["rows_in"] == s["rows_written"] + s["rows_rejected"] for s in per_source.values())
    table = pq.read_table(entry["shards"])
    got = sorted(table.column("id").to_pylist())
    from llava_core.data.sources import select_indices
    expected_hub = [f"h{i}" for i in select_indices("50%", 8, 3)]
    assert got == sorted(["j3", "j4"] + expected_hub)
    by_id = {r["id"]: r for r in table.to_pylist()}
    for hub_id in expected_hub:  # inline images decode; rows without one are text-only
        assert by_id[hub_id]["num_images"] == (int(hub_id[1:]) % 2)
        assert len(by_id[hub_id]["pixel_values"]["uint8"]) == (int(hub_id[1:]) % 2) * 3 * 64 * 64


def test_shards_hold_the_rows_in_source_order_whatever_actor_finishes_first(ray_session, tiny_dataset, tmp_path):
    # Two actors take 10 batches in turn and finish them in any order; the batch plan draws its seeded order over
    # the shards' rows, so unless they are written in source order the same seed trains on other batches each run.
    rows = json.load(open(tiny_dataset["instruct"]))
    copies = [dict(row, id=f"{row['id']}-{k}") for k in range(5) for row in rows]
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(copies))
    source = SourceSettings(str(path), tiny_dataset["image_folder"])
    entry, _ = pipeline.prepare_dataset("ordered", [source], tiny_dataset["vision"], tiny_dataset["llm"],
                                        ROW_SETTINGS, str(tmp_path / "out"))
    written = pq.read_table(entry["shards"], columns=["index"]).column("index").to_pylist()
    assert len(written) == entry["rows_written"] > 300 and written == sorted(written)


def test_datasets_of_one_run_share_one_pool_and_each_row_gets_its_own_datasets_settings(ray_session, tiny_dataset,
                                                                                        tmp_path):
    """Every dataset of a run goes through one actor pool in one pass; a batch of 32 straddles the two datasets here
    (20 rows each), and each row is still prepared with its own dataset's settings, as preparing it alone does. The
    second name has a space, which pyarrow's partitioned write escapes in the directory it writes."""
    import dataclasses

    from llava_core.data.rows import RowPreparer

    rows, sources, folder = {}, {}, {"align": "dataset=align", "instruct mix": "dataset=instruct%20mix"}
    for name, source in (("align", "align"), ("instruct mix", "instruct")):
        rows[name] = json.load(open(tiny_dataset[source]))[:20]
        (tmp_path / f"{source}.json").write_text(json.dumps(rows[name]))
        sources[name] = SourceSettings(str(tmp_path / f"{source}.json"), tiny_dataset["image_folder"])
    settings = {"align": dataclasses.replace(ROW_SETTINGS, template="plain"), "instruct mix": ROW_SETTINGS}
    prepared = pipeline.prepare_datasets({name: ([sources[name]], settings[name]) for name in rows},
                                         tiny_dataset["vision"], tiny_dataset["llm"], str(tmp_path / "out"))
    assert list(prepared) == ["align", "instruct mix"]
    for name, (entry, lengths) in prepared.items():
        assert entry["rows_in"] == 20 and entry["rows_written"] >= 18 and entry["template"] == settings[name].template
        assert entry["shards"] and all(f"/rows/{folder[name]}/status=written/" in s for s in entry["shards"])
        written = pq.read_table(entry["shards"], columns=["id", "index", "input_ids", "labels"]).to_pylist()
        assert [r["index"] for r in written] == sorted(r["index"] for r in written)  # source order
        alone = RowPreparer(tiny_dataset["vision"], tiny_dataset["llm"], settings[name])
        expected = [alone.prepare(rows[name][r["index"]], tiny_dataset["image_folder"]) for r in written]
        assert [(r["id"], r["input_ids"], r["labels"]) for r in written] == \
            [(e["id"], e["input_ids"], e["labels"]) for e in expected]
        assert len(lengths) == entry["rows_written"] == len(written)
