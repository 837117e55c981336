"""Hostile annotation files through the real prepare stage: each bad row is its own reject and the rest are written
(each case alone, without Ray: tests/unit/test_hostile_rows.py)."""
from __future__ import annotations

import json
import os

from llava_core.config import SourceSettings
from llava_core.data.rows import RowSettings
from tests.hostile_rows_helpers import BOM, image_row, write


def test_the_prepare_stage_rejects_each_hostile_row_and_writes_the_rest(ray_session, tiny_dataset, image_tree,
                                                                         tmp_path):
    """The real stage on Ray Data: a JSONL file (BOM, CRLF) and a JSON array (BOM) in one dataset, each with good
    rows around its bad ones; rejects.jsonl names every bad row and the counts add up per source."""
    from llava_core.data import pipeline

    good = [json.dumps(image_row(f"good-{i}", "red.png")).encode() for i in range(4)]
    lines = [good[0], b'{"id": "x", "conversations": "caf\xe9"}', good[1], b'{"id": "n", "score": NaN}',
             json.dumps(image_row("dotdot", "../secret.png")).encode(), json.dumps(image_row("link", "escape.png"))
             .encode(), b"[1, 2]"]
    jsonl = write(tmp_path, "rows.jsonl", BOM + b"\r\n".join(lines) + b"\r\n")
    elements = [good[2], b'{"id": "i", "score": -Infinity}', b'{"id": "s" "v": [1, "]"]}', b"[" * 100_000 +
                b"]" * 100_000, json.dumps(image_row("abs", str(image_tree / "red.png"))).encode(), good[3]]
    array = write(tmp_path, "rows.json", BOM + b"[\n" + b",\n".join(elements) + b"\n]\n")
    entry, _ = pipeline.prepare_dataset(
        "mix", [SourceSettings(jsonl, str(image_tree)), SourceSettings(array, str(image_tree))],
        tiny_dataset["vision"], tiny_dataset["llm"],
        RowSettings(template="vicuna_v1", max_length=512, num_actors=1, rows_per_shard=100), str(tmp_path / "out"))
    rejects = [json.loads(line) for line in open(tmp_path / "out" / "mix" / "rejects.jsonl")]
    got = [(os.path.basename(r["source"]), r["index"], r["reason"], r["detail"].split(": ", 1)[0]) for r in rejects]

    def line(k):  # "line k (byte b)", lines counted from 1, after the BOM, CRLF endings
        return f"line {k} (byte {len(BOM) + sum(len(x) + 2 for x in lines[:k - 1])})"

    def element(k):  # elements counted from 0 (the row index), after the BOM and "[\n", ",\n" between them
        return f"element {k} (byte {len(BOM) + 2 + sum(len(x) + 2 for x in elements[:k])})"

    real = os.path.realpath(image_tree)
    assert got == [
        ("rows.json", 1, "malformed_row", element(1)), ("rows.json", 2, "malformed_row", element(2)),
        ("rows.json", 3, "malformed_row", element(3)),
        ("rows.json", 4, "image_path_outside_folder", repr(str(image_tree / "red.png"))),
        ("rows.jsonl", 1, "malformed_row", line(2)), ("rows.jsonl", 3, "malformed_row", line(4)),
        ("rows.jsonl", 4, "image_path_outside_folder", f"'../secret.png' leads out of {image_tree}"),
        ("rows.jsonl", 5, "image_path_outside_folder", f"'escape.png' resolves to {os.path.dirname(real)}/secret.png,"
                                                       f" outside {real}"),
        ("rows.jsonl", 6, "malformed_row", line(7))]
    details = [r["detail"].split(": ", 1)[1] for r in rejects if r["reason"] == "malformed_row"]
    assert details[:3] == ["-Infinity is not JSON (it would be a NaN or infinite number in the training data)",
                           "not JSON: Expecting ',' delimiter at character 11 of the row", "nested too deeply to parse"]
    assert details[3:] == [f"invalid UTF-8 at byte {len(BOM) + len(lines[0]) + 2 + 33}",
                           "NaN is not JSON (it would be a NaN or infinite number in the training data)",
                           "a row must be a JSON object, not a list"]
    assert (entry["rows_in"], entry["rows_written"], entry["rows_rejected"]) == (13, 4, 9)
    assert entry["rejected_by_reason"] == {"image_path_outside_folder": 3, "malformed_row": 6}
    assert {os.path.basename(p): (s["rows_in"], s["rows_written"]) for p, s in entry["sources"].items()} == {
        "rows.jsonl": (7, 2), "rows.json": (6, 2)}
    import pyarrow.parquet as pq
    assert sorted(pq.read_table(entry["shards"]).column("id").to_pylist()) == [f"good-{i}" for i in range(4)]
