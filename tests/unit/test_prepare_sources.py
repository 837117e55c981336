"""Reading annotation files as users have them, and the sampling strategies of a mixture (no Ray needed)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llava_core.config import SourceSettings
from llava_core.data import sources
from llava_core.data.sources import select_indices


def test_sampling_strategies_pick_the_documented_rows():
    assert select_indices("all", 5, 0).tolist() == [0, 1, 2, 3, 4]
    assert select_indices("first:2", 5, 0).tolist() == [0, 1]
    assert select_indices("last:2", 5, 0).tolist() == [3, 4]
    assert select_indices("end:2", 5, 0).tolist() == [3, 4]  # LLaVA-NeXT's spelling
    assert select_indices("first:10", 5, 0).tolist() == [0, 1, 2, 3, 4]  # more than there is: all of it
    assert select_indices("first:50%", 5, 0).tolist() == [0, 1, 2]  # percentages round up, as LLaVA-NeXT's
    picked = select_indices("random:3", 100, seed=7)
    assert len(picked) == len(set(picked.tolist())) == 3 and sorted(picked.tolist()) == picked.tolist()
    assert picked.tolist() == select_indices("random:3", 100, seed=7).tolist()
    assert picked.tolist() != select_indices("random:3", 100, seed=8).tolist()
    assert len(select_indices("25%", 100, 0)) == 25 and select_indices("25%", 100, 0).tolist() != list(range(25))


@pytest.mark.parametrize("spec", ["some", "first:", "random:x", "25", "middle:3"])
def test_bad_sampling_is_an_error(spec):
    with pytest.raises(ValueError, match="sampling"):
        sources.parse_sampling(spec)


def test_json_array_and_jsonl_stream_the_same_rows(tmp_path):
    rows = [{"id": str(i), "conversations": [], "model": ""} for i in range(300)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    from_array = [json.loads(row.raw) for row in sources.iter_rows(str(tmp_path / "a.json"))]
    from_lines = [json.loads(row.raw) for row in sources.iter_rows(str(tmp_path / "a.jsonl"))]
    assert from_array == from_lines == rows
    blocks = list(sources.staged_blocks(SourceSettings(str(tmp_path / "a.json"), "imgs"), rows_per_block=128))
    assert [b.num_rows for b in blocks] == [128, 128, 44]
    assert blocks[2].column("index").to_pylist() == list(range(256, 300))
    assert set(blocks[0].column("image_folder").to_pylist()) == {"imgs"}


def test_hub_parquet_images_travel_inline(tmp_path):
    table = pa.table({
        "id": ["a", "b", "c", "d"],
        "image": [{"bytes": b"PNGDATA", "path": "a.png"}, None, {"bytes": None, "path": "rel/c.jpg"},
                  {"bytes": b"X", "path": None}],
        "conversations": [[{"from": "human", "value": "q"}]] * 4,
    })
    pq.write_table(table, tmp_path / "hub.parquet")
    got = [(json.loads(raw), inline) for raw, inline, _ in sources.iter_rows(str(tmp_path / "hub.parquet"))]
    assert [(row.get("image"), inline) for row, inline in got] == [
        (["a.png"], [b"PNGDATA"]), (None, []), (["rel/c.jpg"], []), (["inline-0"], [b"X"])]
    assert got[0][0]["conversations"] == [{"from": "human", "value": "q"}]


def test_an_unforeseen_error_in_a_row_is_a_counted_reject(tiny_dataset):
    """A row that breaks the code in a way nobody planned for is rejected with the exception, not a crashed job."""
    from llava_core.data.rows import RowPreparer

    preparer = RowPreparer(tiny_dataset["vision"], tiny_dataset["llm"], {"template": "vicuna_v1", "max_length": 512})
    weird = {"id": "w", "image": 5, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                    {"from": "gpt", "value": "a"}]}
    result = preparer.prepare(json.dumps(weird))
    assert (result["id"], result["reason"]) == ("w", "unexpected_error") and "TypeError" in result["detail"]
    good = preparer.prepare(json.dumps({"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                                                      {"from": "gpt", "value": "yo"}]}))
    assert good["reason"] == "" and good["modality"] == "text" and good["num_supervised"] > 0
