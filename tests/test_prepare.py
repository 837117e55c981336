"""The prepare stage on Ray Data: every good row written once, every bad row rejected with its reason."""
import io
import json
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from llava_core.config import SourceSettings
from llava_core.data import pipeline
from llava_core.data.image_layouts import CropPixels
from llava_core.data.rows import RowSettings

pytestmark = pytest.mark.integration

SETTINGS = {"max_length": 260, "too_long": "reject", "image_aspect_ratio": "pad", "max_image_pixels": 1_000_000}
ROW_SETTINGS = RowSettings(template="vicuna_v1", num_actors=2, rows_per_shard=100, **SETTINGS)


def _turns(question="<image>\nWhat colour is the shape?", answer="red"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _save(folder, name, data: bytes):
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def _png(size=(40, 30), colour=(200, 20, 20), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dirty_dataset(tmp_path_factory):
    """One JSON array in the official layout: good rows of each kind plus one row of every bad kind."""
    folder = str(tmp_path_factory.mktemp("dirty"))
    images = os.path.join(folder, "images")
    os.makedirs(images)
    _save(images, "good.png", _png())
    _save(images, "second.png", _png(colour=(20, 20, 200)))
    _save(images, "gif_named.jpg", _png(fmt="GIF"))  # a GIF saved as .jpg: decodes, so it is kept
    _save(images, "truncated.png", _png()[:60])
    _save(images, "text.png", b"this is not an image at all")
    _save(images, "empty.png", b"")
    _save(images, "bomb.png", _png(size=(1200, 1000)))  # 1.2 MP > the 1 MP limit of this test
    good = [
        {"id": "image-row", "image": "good.png", "conversations": _turns()},
        {"id": "tag-after-text", "image": "good.png", "conversations": _turns("What colour?\n<image>")},
        {"id": "text-only", "conversations": _turns("What is one plus one?", "two")},
        {"id": "multi-image", "image": ["good.png", "second.png"],
         "conversations": _turns("<image>\n<image>\nWhich colours?", "red and blue")},
        {"id": "gif-as-jpg", "image": "gif_named.jpg", "conversations": _turns()},
        {"id": "role-content", "image": "good.png",
         "conversations": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]},
    ]
    bad = {
        "image_missing": {"image": "nope.png", "conversations": _turns()},
        "image_corrupt": {"image": "truncated.png", "conversations": _turns()},
        "not_an_image": {"image": "text.png", "conversations": _turns()},
        "image_empty": {"image": "empty.png", "conversations": _turns()},
        "image_too_large": {"image": "bomb.png", "conversations": _turns()},
        "empty_conversation": {"image": "good.png", "conversations": []},
        "malformed_conversation": {"image": "good.png", "conversations": [{"from": "human", "value": 3},
                                                                          {"from": "gpt", "value": "x"}]},
        "roles_out_of_order": {"image": "good.png", "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a"}]},
        "image_tag_mismatch": {"image": ["good.png", "second.png"], "conversations": _turns()},
        "too_long": {"image": "good.png", "conversations": _turns("<image>\n" + "very long question " * 60)},
    }
    good.append({"id": "model-empty", "model": "", "conversations": _turns("Say hi.", "hi")})  # as in mix665k
    rows = good + [{"id": f"bad-{reason}", **row} for reason, row in bad.items()]
    rows.append(7)  # not a row object at all: rejected as malformed_row (it has no id)
    bad["malformed_row"] = None
    path = os.path.join(folder, "data.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return {"path": path, "image_folder": images, "good": [r["id"] for r in good], "bad": bad}


def _prepare(dataset, tiny_dataset, out_dir, path=None, image_folder=None):
    source = SourceSettings(path or dataset["path"], image_folder or dataset["image_folder"])
    return pipeline.prepare_dataset("mix", [source], tiny_dataset["vision"], tiny_dataset["llm"], ROW_SETTINGS,
                                    str(out_dir))


def _expected_rejects(dataset):
    return {(f"bad-{k}" if k != "malformed_row" else ""): k for k in dataset["bad"]}


def test_dirty_dataset_rejects_exactly_the_bad_rows(ray_session, tiny_dataset, dirty_dataset, tmp_path, monkeypatch,
                                                    caplog):
    monkeypatch.setattr(pipeline, "ROW_GROUP_ROWS", 2)  # 7 rows: several row groups, as a real dataset has
    caplog.set_level(logging.INFO, logger="llava_core")
    entry, lengths = _prepare(dirty_dataset, tiny_dataset, tmp_path)
    # the driver's progress line: every row, prepared and written, of every row the sources hold
    finished = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[prepare mix] row 18/18 (100%)")]
    assert len(finished) == 1 and " elapsed " in finished[0] and finished[0].endswith(" ETA 0:00:00"), finished
    footers = [pq.ParquetFile(p).metadata for p in entry["shards"]]
    group_rows = [f.row_group(g).num_rows for f in footers for g in range(f.num_row_groups)]
    assert max(group_rows) <= 2 and sum(group_rows) == 7  # small row groups: a random row reads little
    rejects = [json.loads(line) for line in open(tmp_path / "mix" / "rejects.jsonl")]
    assert {r["id"]: r["reason"] for r in rejects} == _expected_rejects(dirty_dataset)
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


def expand2square(pil_img, background_color):
    """LLaVA-1.5's own padding (llava/mm_utils.py), the reference prepare and the export's processor must match."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


@pytest.mark.unit
def test_padding_is_the_official_expand2square_in_the_exports_processor(tiny_dataset):
    """Prepare's crops are LLaVA-1.5's: `expand2square` with the background `tuple(int(x * 255) for x in
    image_mean)` (122, 116, 104 for CLIP, truncated, not rounded), then the tower's CLIP processor. The processor the
    export saves (`LlavaImageProcessor`, `do_pad`) computes the same pixels on its own."""
    from transformers import AutoImageProcessor

    from llava_core.data.rows import RowPreparer

    preparer = RowPreparer(tiny_dataset["vision"], tiny_dataset["llm"],
                           {"template": "vicuna_v1", "image_folder": "", "max_length": 512})
    tall = Image.new("RGB", (32, 64), (255, 255, 255))  # padded left and right to 64x64
    buffer = io.BytesIO()
    tall.save(buffer, format="PNG")
    images = preparer.images  # the crop format (llava_core/data/image_layouts.py)
    record = images.prepare([buffer.getvalue()]).columns["pixel_values"]
    crop = np.frombuffer(record["uint8"], dtype=np.uint8).reshape(3, 64, 64)
    scale, offset = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (record["scale"], record["offset"]))
    pixels = crop * scale + offset
    tower = AutoImageProcessor.from_pretrained(tiny_dataset["vision"])
    background = tuple(int(x * 255) for x in tower.image_mean)
    assert background == (122, 116, 104)
    official = tower(images=[expand2square(tall, background)], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(pixels, official, atol=1e-5)  # lossless: uint8 crop + affine = the float path
    assert type(images.image_processor).__name__.startswith("LlavaImageProcessor") and images.image_processor.do_pad
    export_side = images.image_processor(images=[tall], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(export_side, official, atol=1e-5)
    expected_pad = (np.array(background) / 255 - np.array(tower.image_mean)) / np.array(tower.image_std)
    np.testing.assert_allclose(pixels[:, 32, 0], expected_pad, atol=1e-5)  # left band: the truncated mean colour
    assert pixels[:, 32, 32].min() > 1.0  # white centre stays white


@pytest.mark.unit
def test_reject_threshold_stops_the_stage():
    manifest = {"datasets": {"mix": {"rows_in": 100, "rows_rejected": 5, "rejected_by_reason": {"image_missing": 5},
                                     "source": "x.json"}}}
    pipeline.check_reject_fraction(manifest, 0.05)
    with pytest.raises(pipeline.TooManyRejects, match="5 of 100 rows rejected"):
        pipeline.check_reject_fraction(manifest, 0.01)


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 protocol server (moto) on a free loopback port; this process's AWS_* variables point at it."""
    from tests.s3_server import environment, s3_server as start_s3_server

    with start_s3_server() as env, environment(env):
        yield env["AWS_ENDPOINT_URL"]


def _upload(folder: str, bucket: str) -> str:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            s3.upload_file(path, bucket, os.path.relpath(path, folder))
    return f"s3://{bucket}"


def _shard_rows(entry) -> list[dict]:
    table = pq.read_table(entry["shards"]).drop_columns(["source"])  # the source path is the one thing that differs
    return table.to_pylist()  # in the shards' order: the same source gives the same order


@pytest.mark.slow
def test_the_same_preparation_from_s3_gives_identical_shards(ray_session, tiny_dataset, dirty_dataset, s3_server,
                                                              tmp_path):
    local_entry, _ = _prepare(dirty_dataset, tiny_dataset, tmp_path / "local")
    bucket = _upload(os.path.dirname(dirty_dataset["path"]), "llava-dirty")
    s3_entry, _ = _prepare(dirty_dataset, tiny_dataset, tmp_path / "s3", path=f"{bucket}/data.json",
                           image_folder=f"{bucket}/images")
    assert _shard_rows(s3_entry) == _shard_rows(local_entry)
    rejects = [json.loads(line) for line in open(tmp_path / "s3" / "mix" / "rejects.jsonl")]
    assert {r["id"]: r["reason"] for r in rejects} == _expected_rejects(dirty_dataset)
    assert {r["source"] for r in rejects} == {f"{bucket}/data.json"}
    assert {k: s3_entry[k] for k in ("rows_in", "rows_written", "rows_rejected", "rejected_by_reason")} == \
        {k: local_entry[k] for k in ("rows_in", "rows_written", "rows_rejected", "rejected_by_reason")}


def test_mixture_of_jsonl_and_hub_parquet_with_sampling(ray_session, tiny_dataset, dirty_dataset, tmp_path):
    """Two sources in one dataset: JSONL read from an image folder (last 3 rows), and hub-layout parquet with the
    image bytes inline (struct {bytes, path}, a plain binary list, or none) sampled at random."""
    import pyarrow as pa

    folder = dirty_dataset["image_folder"]
    jsonl = tmp_path / "rows.jsonl"
    rows = [{"id": f"j{i}", "image": "good.png", "conversations": _turns()} for i in range(5)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]) + "{not json\n" + json.dumps(rows[4]) + "\n")
    conversations = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "blue"}]
    hub = pa.table({
        "id": [f"h{i}" for i in range(8)],
        "image": [{"bytes": _png(colour=(20, 20, 200)), "path": f"h{i}.png"} if i % 2 else None for i in range(8)],
        "conversations": [conversations if i % 2 else _turns("Say hi.", "hi") for i in range(8)],
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
