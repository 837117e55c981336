"""The benchmarks whose `--smoke` run takes seconds (tests/benchmarks_helpers.py says what each run checks); the
longer ones are tests/end_to_end/test_benchmarks.py."""
from tests.benchmarks_helpers import fraction, positive, smoke


def test_padding(tmp_path):
    summary = smoke("padding", tmp_path)
    assert summary["rows"] == 2000
    assert set(summary) == {"naive", "length_grouped", "modality_grouped", "packed", "rows"}
    # the length mix pads a random micro-batch heavily; grouping by length (within a modality too) and packing cut that
    assert 0 < summary["packed"] < summary["naive"] < 1
    assert 0 < summary["length_grouped"] < summary["naive"] and 0 < summary["modality_grouped"] < summary["naive"]


def test_annotation_reader(tmp_path):
    summary = smoke("annotation_reader", tmp_path, "--cache-dir", str(tmp_path))
    assert 0.2 <= summary["mb"] <= 0.3 and summary["indent"] is None
    assert summary["rows"] > 100  # ~1.5 KB a row
    assert positive(summary["ijson_rows_per_s"]) and positive(summary["reader_rows_per_s"])
    assert positive(summary["ratio"])


def test_tile_pixels(tmp_path):
    summary = smoke("tile_pixels", tmp_path)
    assert set(summary) == {"llava_onevision", "llava_next"}
    for figures in summary.values():
        assert figures["repeats"] == 2 and positive(figures["ms_per_image"]) and positive(figures["jpeg_bytes"])
        assert figures["views"] > 1  # a 640x480 photo: the base view and its tiles


def test_onevision_tower_probe(tmp_path):
    summary = smoke("onevision_tower_probe", tmp_path)
    assert summary["tower"] == "untrained" and summary["scenes"] == 40
    accuracies = [*summary["dot"].values(), *summary["layout"].values(),
                  *(v for k, v in summary["tile_position"].items() if k != "tile_shape_patches")]
    assert len(accuracies) == 9 and all(fraction(a) for a in accuracies), summary
    assert summary["tile_position"]["tile_shape_patches"] > 0
