"""Every script in benchmarks/ runs its own code path in `--smoke` mode (benchmarks/harness.py) and prints exactly one
line on stdout, its JSON summary, whose figures match the smoke sizes: benchmarks no test runs rot unseen.

Each runs as a user runs it, in its own process (`PYTHONPATH` the repo root, a temporary working directory); those
that need Ray start their own small local one. Figures are checked for shape and sanity, not speed: at smoke sizes
they measure nothing. gpu_step.py's smoke run (with --save) is tests/test_gpu_step_benchmark.py."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.other_readers import VLLM_PYTHON

pytestmark = pytest.mark.integration

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def smoke(name: str, cwd, *args: str, timeout: int = 300) -> dict:
    """`benchmarks/<name>.py --smoke`'s summary; its stdout must hold that one line and nothing else."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("RAY_ADDRESS", None)  # its own Ray, never the test session's
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--smoke", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be the summary line alone, got: {done.stdout[-2000:]}"
    return json.loads(lines[0])


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def fraction(value) -> bool:
    return isinstance(value, (int, float)) and 0 <= value <= 1


def test_padding(tmp_path):
    summary = smoke("padding", tmp_path)
    assert summary["rows"] == 2000
    assert set(summary) == {"naive", "length_grouped", "packed", "rows"}
    # the length mix pads a random micro-batch heavily; grouping by length and packing cut that
    assert 0 < summary["packed"] < summary["naive"] < 1
    assert 0 < summary["length_grouped"] < summary["naive"]


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


@pytest.mark.slow  # over 40 s measured with the machine's load at ~13
def test_prepare_throughput(tmp_path):
    summary = smoke("prepare_throughput", tmp_path, "--cache-dir", str(tmp_path / "cache"))
    assert summary["rows"] == 16 and summary["floor_rows"] == 8 and summary["cores"] == 1
    assert positive(summary["samples_per_s"]) and positive(summary["floor_samples_per_s_single_core"])
    assert positive(summary["efficiency"])


@pytest.mark.slow  # over 40 s measured with the machine's load at ~13
def test_serve_load(tmp_path):
    summary = smoke("serve_load", tmp_path)
    assert summary["clients"] == 2 and summary["max_tokens"] == 2
    for phase in ("concurrent", "sequential"):
        assert summary[phase]["requests"] == 4 and summary[phase]["errors"] == 0
        assert positive(summary[phase]["rps"]) and positive(summary[phase]["p50_s"])
        assert summary[phase]["p50_s"] <= summary[phase]["p99_s"]
    assert positive(summary["speedup"])


@pytest.mark.slow  # over 40 s measured with the machine's load at ~13
def test_eval_throughput(tmp_path):
    summary = smoke("eval_throughput", tmp_path)
    assert summary["prompts"] == 8  # 4 questions, each with its image and blind
    assert summary["actors"] == 1 and summary["max_new_tokens"] == 2
    assert positive(summary["in_process_prompts_per_s"]) and positive(summary["endpoint_prompts_per_s"])
    assert summary["agreement"] == 1.0  # one generation path: the endpoint answers as the in-process actors do
    assert len(summary["accuracy"]) == 2 and all(fraction(a) for a in summary["accuracy"])


@pytest.mark.slow  # ~2 min 45 s measured with the machine's load at ~15
def test_train_step(tmp_path):
    summary = smoke("train_step", tmp_path)
    assert summary["steps"] == 4 and summary["warmup"] == 1
    assert positive(summary["project_tokens_per_s"]) and positive(summary["bare_tokens_per_s"])
    assert positive(summary["ratio"])


@pytest.mark.slow  # ~3 min 50 s measured with the machine's load at ~13: two training stages
def test_train_memory(tmp_path):
    summary = smoke("train_memory", tmp_path)
    assert summary["rows"] == 32 and summary["steps"] == 4
    assert positive(summary["rss_gib_small"]) and positive(summary["rss_gib_large"]) and positive(summary["ratio"])
    assert fraction(summary["data_wait_fraction"])


@pytest.mark.slow  # ~5 min measured with the machine's load at ~13: vLLM's CPU start-up
def test_serve_vllm_load(tmp_path):
    if not os.path.exists(VLLM_PYTHON):
        pytest.fail(f"{VLLM_PYTHON} is missing: `make readers` (part of `make test`) builds it")
    summary = smoke("serve_vllm_load", tmp_path, timeout=600)
    assert summary["clients"] == 2 and summary["requests"] == 4
    for path in ("direct_streaming", "default"):
        for server in ("vllm_server", "llava_ray"):
            assert summary[path][server]["errors"] == 0 and positive(summary[path][server]["rps"])
        assert len(summary[path]["rounds_ratio"]) == 1 and positive(summary[path]["ratio"])
    assert summary["ratio"] == summary["direct_streaming"]["ratio"]
