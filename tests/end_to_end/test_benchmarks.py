"""The benchmarks whose `--smoke` run takes over ~40 s (tests/benchmarks_helpers.py says what each run checks); the
quicker ones are tests/integration/test_benchmarks.py."""
import os

import pytest

from tests.benchmarks_helpers import fraction, positive, smoke
from tests.other_readers import VLLM_PYTHON


# over 40 s measured with the machine's load at ~13
def test_prepare_throughput(tmp_path):
    summary = smoke("prepare_throughput", tmp_path, "--cache-dir", str(tmp_path / "cache"))
    assert summary["rows"] == 16 and summary["floor_rows"] == 8 and summary["cores"] == 1
    assert positive(summary["samples_per_s"]) and positive(summary["floor_samples_per_s_single_core"])
    assert positive(summary["efficiency"])


# over 40 s measured with the machine's load at ~13
def test_serve_load(tmp_path):
    summary = smoke("serve_load", tmp_path)
    assert summary["clients"] == 2 and summary["max_tokens"] == 2
    for phase in ("concurrent", "sequential"):
        assert summary[phase]["requests"] == 4 and summary[phase]["errors"] == 0
        assert positive(summary[phase]["rps"]) and positive(summary[phase]["p50_s"])
        assert summary[phase]["p50_s"] <= summary[phase]["p99_s"]
    assert positive(summary["speedup"])


# over 40 s measured with the machine's load at ~13
def test_eval_throughput(tmp_path):
    summary = smoke("eval_throughput", tmp_path)
    assert summary["prompts"] == 8  # 4 questions, each with its image and blind
    assert summary["actors"] == 1 and summary["max_new_tokens"] == 2
    assert positive(summary["in_process_prompts_per_s"]) and positive(summary["endpoint_prompts_per_s"])
    assert summary["agreement"] == 1.0  # one generation path: the endpoint answers as the in-process actors do
    assert len(summary["accuracy"]) == 2 and all(fraction(a) for a in summary["accuracy"])


# ~2 min 45 s measured with the machine's load at ~15
def test_train_step(tmp_path):
    summary = smoke("train_step", tmp_path)
    assert summary["steps"] == 4 and summary["warmup"] == 1
    assert positive(summary["project_tokens_per_s"]) and positive(summary["bare_tokens_per_s"])
    assert positive(summary["ratio"])


# ~3 min 50 s measured with the machine's load at ~13: two training stages
def test_train_memory(tmp_path):
    summary = smoke("train_memory", tmp_path)
    assert summary["rows"] == 32 and summary["steps"] == 4
    assert positive(summary["rss_gib_small"]) and positive(summary["rss_gib_large"]) and positive(summary["ratio"])
    assert fraction(summary["data_wait_fraction"])


# ~2.5 min: vLLM's CPU start-up, twice
def test_serve_vllm_load(tmp_path):
    if not os.path.exists(VLLM_PYTHON):
        pytest.fail(f"{VLLM_PYTHON} is missing: `make readers` (part of `make test`) builds it")
    summary = smoke("serve_vllm_load", tmp_path, timeout=600)
    assert summary["clients"] == 2 and summary["requests"] == 4
    assert "default" not in summary  # the smoke runs the path nothing else deploys (the default: test_serve_vllm.py)
    path = summary["direct_streaming"]
    for server in ("vllm_server", "llava_ray"):
        assert path[server]["errors"] == 0 and positive(path[server]["rps"])
    assert len(path["rounds_ratio"]) == 1 and positive(path["ratio"]) and summary["ratio"] == path["ratio"]
