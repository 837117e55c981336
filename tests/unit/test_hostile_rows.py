"""Hostile annotation files: one odd line or element is its own `malformed_row` reject and the rows around it are
read; a file that cannot be read at all fails naming the file and the byte offset; image names stay inside their
folder; an eval set's question ids never become paths. The real prepare stage on them:
tests/integration/test_hostile_rows.py."""
from __future__ import annotations

import io
import json
import os
import re

import pyarrow as pa
import pytest

from llava_core.config import SourceSettings
from llava_core.data import images, sources
from llava_core.data.formats import RowError
from llava_core.data.sources import ArrayReader, SourceError
from tests.hostile_rows_helpers import BOM, image_row, png, write


def text_row(row_id: str) -> bytes:
    return json.dumps({"id": row_id, "conversations": [{"from": "human", "value": "Say hi."},
                                                       {"from": "gpt", "value": "hi"}]}).encode()


@pytest.fixture(scope="module")
def preparer(tiny_dataset):
    from llava_core.data.rows import RowPreparer

    return RowPreparer(tiny_dataset["vision"], tiny_dataset["llm"], {"template": "vicuna_v1", "max_length": 512})


def prepared(preparer, path: str, image_folder: str = "") -> list[dict]:
    """Every row of the file through staging and the row stage, as prepare runs them (without Ray)."""
    out = []
    for block in sources.staged_blocks(SourceSettings(path, image_folder)):
        out += preparer(block).select(["id", "index", "reason", "detail", "status"]).to_pylist()
    return out


# ---- one bad line of JSONL, between two good ones ----

DEEP = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
JSONL_LINES = {
    "invalid_utf8": (b'{"id": "x", "conversations": "caf\xe9"}', r"invalid UTF-8 at byte {start_plus_33}"),
    "bom_mid_file": (BOM + text_row("bom"), r"a byte-order mark \(U\+FEFF\) inside the file"),
    "nan": (b'{"id": "n", "score": NaN}', r"NaN is not JSON"),
    "infinity": (b'{"id": "i", "score": Infinity}', r"Infinity is not JSON"),
    "minus_infinity": (b'{"id": "m", "score": -Infinity}', r"-Infinity is not JSON"),
    "overflowing_float": (b'{"id": "o", "score": 1e999}', r"the number 1e999 is out of range"),
    "lone_surrogate": (b'{"id": "s", "conversations": [{"from": "human", "value": "\\ud800"}]}',
                       r"lone UTF-16 surrogate"),
    "deep_nesting": (DEEP, r"nested too deeply to parse"),
    "nesting_over_the_limit": (b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", r"nested deeper than 64 levels"),
    "syntax_error": (b'{"id": "x", "conversations": [}', r"not JSON: Expecting value at character 30 of the row"),
    "a_list": (b'[{"id": "l"}]', r"a row must be a JSON object, not a list"),
    "a_number": (b"7", r"a row must be a JSON object, not a number"),
    "a_string": (b'"text"', r"a row must be a JSON object, not a string"),
    "null": (b"null", r"a row must be a JSON object, not null"),
    "huge_integer": (b'{"id": ' + b"9" * 5000 + b"}", r"unreadable JSON: Exceeds the limit \(4300 digits\)"),
    "control_character": (b'{"id": "t\tab"}', r"not JSON: Invalid control character"),
}


def assert_rejected_between_neighbours(got: list, where: str, start: int, detail: str) -> None:
    """The defective row (at byte `start`) is its own malformed_row reject, and the good rows on both sides are
    written."""
    assert [(r["id"], r["index"], r["status"]) for r in got] == [
        ("before", 0, "written"), ("", 1, "rejected"), ("after", 2, "written")]
    assert got[1]["reason"] == "malformed_row"
    detail = detail.format(start_plus_33=start + 33)
    assert re.fullmatch(rf"{where} \(byte {start}\): .*{detail}.*", got[1]["detail"]), got[1]["detail"]


@pytest.mark.parametrize("case", list(JSONL_LINES))
def test_a_bad_jsonl_line_is_its_own_reject(case, tmp_path, preparer):
    line, detail = JSONL_LINES[case]
    first = text_row("before") + b"\n"
    path = write(tmp_path, "rows.jsonl", first + line + b"\n\n" + text_row("after") + b"\n")
    assert_rejected_between_neighbours(prepared(preparer, path), "line 2", len(first), detail)


def test_a_cut_off_last_line_says_so(tmp_path, preparer):
    path = write(tmp_path, "cut.jsonl", text_row("a") + b"\n" + text_row("b")[:-9])
    got = prepared(preparer, path)
    assert [r["status"] for r in got] == ["written", "rejected"]
    assert got[1]["detail"].startswith("line 2 (byte ") and "(the file ends inside this line: cut off?)" in \
        got[1]["detail"]


def test_bom_and_crlf_jsonl_reads_every_row(tmp_path, preparer):
    path = write(tmp_path, "windows.jsonl", BOM + b"\r\n".join(text_row(f"r{i}") for i in range(3)) + b"\r\n")
    got = prepared(preparer, path)
    assert [(r["id"], r["status"]) for r in got] == [("r0", "written"), ("r1", "written"), ("r2", "written")]


def test_offsets_on_the_first_line_count_the_bom(tmp_path):
    path = write(tmp_path, "bom.jsonl", BOM + b'{"id": "\xff"}\n' + text_row("b") + b"\n")
    assert [r.defect for r in sources.iter_rows(path)] == ["line 1 (byte 3): invalid UTF-8 at byte 11", None]


# ---- one bad element of a JSON array, between two good ones ----

ARRAY_ELEMENTS = {
    "invalid_utf8": (b'{"id": "x", "conversations": "caf\xe9"}', r"invalid UTF-8 at byte {start_plus_33}"),
    "bom_before_element": (BOM + text_row("bom"), r"a byte-order mark \(U\+FEFF\) inside the file"),
    "nan": (b'{"id": "n", "score": NaN}', r"NaN is not JSON"),
    "infinity": (b'{"id": "i", "score": Infinity}', r"Infinity is not JSON"),
    "minus_infinity": (b'{"id": "m", "score": -Infinity}', r"-Infinity is not JSON"),
    "lone_surrogate": (b'{"id": "s", "v": "\\ud800"}', r"lone UTF-16 surrogate"),
    "deep_nesting": (b"[" * 100_000 + b"]" * 100_000, r"nested too deeply to parse"),
    "syntax_error": (b'{"id": "x" "v": 1}', r"not JSON: Expecting ',' delimiter at character 11 of the row"),
    # commas and brackets in strings, and a stray `}`: the scanner still finds the element's end
    "syntax_error_with_brackets_in_strings": (b'{"id": "a,]}[", "v": [1, 2,, {"w": "]"}]}}',
                                              r"not JSON: Expecting value"),
    "a_list": (b'["a", "b"]', r"a row must be a JSON object, not a list"),
    "a_number": (b"3.5", r"a row must be a JSON object, not a number"),
    "a_string": (b'"a, ] string"', r"a row must be a JSON object, not a string"),
    "garbage_word": (b"undefined", r"not JSON: Expecting value at character 0 of the row"),
}


@pytest.mark.parametrize("case", list(ARRAY_ELEMENTS))
def test_a_bad_array_element_is_its_own_reject(case, tmp_path, preparer):
    element, detail = ARRAY_ELEMENTS[case]
    head = b'[\n  ' + text_row("before") + b",\n  "
    path = write(tmp_path, "rows.json", head + element + b",\n  " + text_row("after") + b"\n]\n")
    assert_rejected_between_neighbours(prepared(preparer, path), "element 1", len(head), detail)


def test_a_bom_prefixed_array_is_an_array(tmp_path, preparer):
    rows = [json.loads(text_row(f"r{i}")) for i in range(3)]
    path = write(tmp_path, "bom.json", BOM + json.dumps(rows, indent=2).encode())
    got = prepared(preparer, path)
    assert [(r["id"], r["status"]) for r in got] == [("r0", "written"), ("r1", "written"), ("r2", "written")]


def test_a_missing_comma_joins_two_elements_into_one_reject(tmp_path):
    path = write(tmp_path, "comma.json", b'[{"id": "a"}, {"id": "b"} {"id": "c"}, {"id": "d"}]')
    got = list(sources.iter_rows(path))
    assert [json.loads(r.raw)["id"] for r in (got[0], got[2])] == ["a", "d"]
    assert got[1].defect == "element 1 (byte 14): not JSON: expected , or ] after the row at character 11 of the row"


def test_elements_across_chunk_boundaries_read_the_same(tmp_path):
    """Multi-byte characters, defects and offsets come out the same whatever the chunk cuts through."""
    data = (BOM + b'[{"a": "\xc3\xbc\xe2\x82\xac"}, {"a": NaN}, {"a": "x\xff\xc3\xbc"}, {"a": "\xf0\x9f\x98\x80"},'
            b' {"a": [1, "]"] "b"}, 12345, {"a": "\\ud83d\\ude00"}]')
    expected = [(r.raw, r.defect) for r in ArrayReader(io.BytesIO(data), "f.json").rows()]
    assert [d is None for _, d in expected] == [True, False, False, True, False, False, True]
    assert expected[2][1] == "element 2 (byte 32): invalid UTF-8 at byte 40"  # 3 BOM + 1 + 14 + 2 + 10 + 2
    for chunk in range(1, 40):
        assert [(r.raw, r.defect) for r in ArrayReader(io.BytesIO(data), "f.json", chunk).rows()] == expected, chunk


def test_defective_rows_stage_as_arrow_accepts_them_and_keep_their_index(tmp_path):
    lines = [text_row("a"), b'{"id": "\xff\xfe"}', b'{"v": "\\udfff"}', text_row("d")]
    path = write(tmp_path, "rows.jsonl", b"\n".join(lines) + b"\n")
    table = pa.concat_tables(sources.staged_blocks(SourceSettings(path, "imgs")))
    assert table.column("index").to_pylist() == [0, 1, 2, 3]
    assert table.column("raw").to_pylist()[1] == '{"id": "\ufffd\ufffd"}'  # replacement characters
    assert [d is None for d in table.column("defect").to_pylist()] == [True, False, False, True]
    kept = sources.keep_indices(table, sources.select_indices("last:3", table.num_rows, 0))
    assert kept.column("index").to_pylist() == [1, 2, 3]  # a malformed row is a row for sampling too


# ---- files that cannot be read as rows at all ----

@pytest.mark.parametrize("data", [b"", b"  \n\t\r\n  ", b"[]", BOM + b" [ ]\n"], ids=["empty", "whitespace", "[]",
                                                                                       "bom-empty-array"])
def test_files_without_rows_have_no_rows(data, tmp_path):
    assert list(sources.iter_rows(write(tmp_path, "none.json", data))) == []


@pytest.mark.parametrize("data, message", [
    (b'[{"id": "a"}, {"id": "b", "conversations": [{"from": "hu', "the array is never closed: element 1 runs to "
                                                                 "the end of the file (byte 14)"),
    (b'[{"id": "a"},\n', "the array is never closed: the file ends after a comma or the [ (byte 14)"),
    (b'[{"id": "a"}] [{"id": "b"}]', "data after the ] that closes the array (byte 14)"),
    (b'[{"id": "a"}, {"id": "unterminated}]', "the array is never closed: element 1 runs to the end of the file "
                                              "(byte 14)"),
    (png(), "neither a JSON array nor JSON lines: none of its first 6 lines is a JSON object; line 1 (byte 0): "
            "invalid UTF-8 at byte 0"),
    (b"id,image\n1,a.png\n2,b.png\n", "neither a JSON array nor JSON lines: none of its first 3 lines"),
], ids=["truncated", "after-a-comma", "two-arrays", "unterminated-string", "a-png", "csv"])
def test_unreadable_files_fail_naming_the_file_and_byte(data, message, tmp_path):
    path = write(tmp_path, "bad.json", data)
    with pytest.raises(SourceError) as error:
        list(sources.iter_rows(path))
    assert str(error.value).startswith(f"{path}: {message}")


def test_a_truncated_array_yields_its_rows_before_failing(tmp_path):
    """The serve demo reads a cut-off file up to its first good row; prepare fails when it reaches the cut."""
    path = write(tmp_path, "cut.json", b"[" + text_row("a") + b", " + text_row("b")[:20])
    rows = sources.iter_rows(path)
    assert json.loads(next(rows).raw)["id"] == "a"
    with pytest.raises(SourceError, match=re.escape(f"{path}: the array is never closed")):
        next(rows)


def test_an_io_error_names_the_file_and_byte():
    class FailingStream(io.RawIOBase):
        def __init__(self):
            self.served = False

        def read(self, size=-1):
            if self.served:
                raise OSError("connection reset")
            self.served = True
            return b"[" + text_row("a") + b", "

    rows = ArrayReader(FailingStream(), "s3://bucket/rows.json", chunk_bytes=1024).rows()
    served = len(b"[" + text_row("a") + b", ")
    with pytest.raises(SourceError, match=rf"^s3://bucket/rows.json: reading failed at byte {served}: connection "
                                          "reset"):
        list(rows)


# ---- image names stay inside their folder (the folder: tests/hostile_rows_helpers.py's image_tree) ----

def outside_names(folder) -> list[str]:
    secret = str(folder.parent / "secret.png")
    return ["../secret.png", "sub/../../secret.png", "./sub/./../../secret.png", secret, f"file://{secret}",
            "s3://other-bucket/secret.png", "http://169.254.169.254/latest/meta-data", "escape.png",
            "parent/secret.png"]


def test_names_that_leave_the_image_folder_are_rejected(image_tree):
    for name in outside_names(image_tree):
        with pytest.raises(RowError) as error:
            images.read_image_bytes(str(image_tree), name)
        assert error.value.reason == "image_path_outside_folder", name
    red = png()
    for name in ("red.png", "sub/../red.png", "./red.png", "inside.png"):  # inside after normalising: read
        assert images.read_image_bytes(str(image_tree), name) == red


def test_the_setting_reads_absolute_paths_and_uris_as_given(image_tree):
    secret = png((0, 0, 0))
    for name in ("../secret.png", str(image_tree.parent / "secret.png"), f"file://{image_tree.parent}/secret.png",
                 "escape.png"):
        assert images.read_image_bytes(str(image_tree), name, allow_outside=True) == secret


def test_an_s3_folder_resolves_dot_dot_as_text():
    assert images.confined_path("s3://bucket/data/images", "coco/../vg/1.jpg") == "s3://bucket/data/images/vg/1.jpg"
    for name in ("../other/1.jpg", "a/../../1.jpg", "/1.jpg", "s3://bucket/other/1.jpg"):
        with pytest.raises(RowError, match="image_path_outside_folder"):
            images.confined_path("s3://bucket/data/images", name)


def test_outside_names_are_rejects_in_the_row_stage_and_allowed_by_the_setting(image_tree, preparer, tiny_dataset,
                                                                              tmp_path):
    from llava_core.data.rows import RowPreparer

    names = ["red.png", *outside_names(image_tree)[:5], "escape.png"]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(image_row(f"r{i}", name)) + "\n" for i, name in enumerate(names)))
    got = prepared(preparer, str(path), str(image_tree))
    assert [r["reason"] for r in got] == [""] + ["image_path_outside_folder"] * (len(names) - 1)
    assert got[1]["detail"] == f"'../secret.png' leads out of {image_tree}"
    real = os.path.realpath(image_tree)  # tmp_path may itself lie behind a symlink
    assert got[-1]["detail"] == f"'escape.png' resolves to {os.path.dirname(real)}/secret.png, outside {real}"
    lenient = RowPreparer(tiny_dataset["vision"], tiny_dataset["llm"],
                          {"template": "vicuna_v1", "max_length": 512, "allow_paths_outside_image_folder": True})
    assert [r["reason"] for r in prepared(lenient, str(path), str(image_tree))] == [""] * len(names)


def test_the_setting_is_a_workflow_setting_off_by_default():
    from llava_core.config import WorkflowError, load_workflow

    assert load_workflow("workflows/quickstart.yaml").prepare.allow_paths_outside_image_folder is False
    on = load_workflow("workflows/quickstart.yaml", ["prepare.allow_paths_outside_image_folder=true"])
    assert on.prepare.allow_paths_outside_image_folder is True
    with pytest.raises(WorkflowError, match="prepare.allow_paths_outside_image_folder"):
        load_workflow("workflows/quickstart.yaml", ["prepare.allow_paths_outside_image_folder=maybe"])


def test_the_serve_demo_skips_defective_rows_and_outside_paths(image_tree, tmp_path):
    from llava_core.config import DatasetSettings
    from llava_core.demo import instruct_question

    path = tmp_path / "instruct.json"
    path.write_bytes(b"[" + json.dumps(image_row("nan", "red.png")).replace('"red"', "NaN").encode() + b", "
                     + json.dumps(image_row("out", "../secret.png")).encode() + b", "
                     + json.dumps(image_row("good", "red.png")).encode() + b"]")
    question = instruct_question(DatasetSettings(path=str(path), image_folder=str(image_tree)))
    assert question.origin == f"{path} row 2 (red.png)" and question.images == [png()]
    lenient = instruct_question(DatasetSettings(path=str(path), image_folder=str(image_tree)), True)
    assert lenient.origin == f"{path} row 1 (../secret.png)"


# ---- eval question ids never become paths ----

def test_question_ids_become_safe_distinct_file_names(tmp_path):
    import base64

    from llava_core.eval.evaluate import file_stem, store_inline_images
    from llava_core.eval.layouts import EvalItem

    stems = [file_stem(q) for q in ("../../etc/x", "a/b", "a_b", "..", "", 17, "caf\u00e9 \ud800")]
    assert len(set(stems)) == len(stems)
    for stem in stems:
        assert "/" not in stem and not stem.startswith(".") and re.fullmatch(r"[A-Za-z0-9._-]+-[0-9a-f]{12}", stem)
    assert stems[0].startswith("etc_x-") and stems[5].startswith("17-")
    items = [EvalItem("k", "../../etc/x", "q?", ["a"], image_b64=base64.b64encode(png()).decode())]
    folder = tmp_path / "evaluate" / "set" / "images"
    store_inline_images(items, str(folder))
    assert os.path.dirname(items[0].image_path) == str(folder) and os.listdir(folder) == [
        os.path.basename(items[0].image_path)]
    assert not (tmp_path / "etc").exists()


def test_the_plan_names_an_unreadable_file_instead_of_a_traceback(tmp_path):
    from llava_core.config import WorkflowError
    from llava_core.plan import source_rows

    path = tmp_path / "cut.json"
    path.write_text('[{"id": 1}, {"id": 2')
    with pytest.raises(WorkflowError, match=r"cut\.json.*byte"):
        source_rows(str(path))
