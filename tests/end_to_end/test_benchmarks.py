"""The benchmarks whose `--smoke` run takes over ~40 s (tests/benchmarks_helpers.py says what each run checks); the
quicker ones are tests/integration/test_benchmarks.py.

The smokes run two at a time, started together by the module's first test, longest first: each alone keeps ~1.0-1.6
of the two cores busy (Ray and vLLM start-ups wait more than they compute), and at smoke sizes they measure nothing
that sharing the machine could spoil. Each test checks its own run's summary."""
import concurrent.futures
import os

import pytest

from tests.benchmarks_helpers import fraction, positive, smoke
from tests.other_readers import VLLM_PYTHON

SMOKES = {  # name -> timeout (s), longest first
    "serve_vllm_load": 600,  # ~2 min alone: vLLM's CPU start-up, twice
    "train_memory": 300,  # ~55 s alone: two training stages
    "train_step": 300,
    "prepare_throughput": 300,
    "eval_throughput": 300,
    "serve_load": 300,
}


@pytest.fixture(scope="module")
def smokes(request, tmp_path_factory):
    """The summary of each selected test's smoke (`test_<name>`), as a future: a `-k` run starts only its own."""
    selected = {item.name.removeprefix("test_") for item in request.session.items if item.module is request.module}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {}
        for name in (n for n in SMOKES if n in selected):
            cwd = tmp_path_factory.mktemp(name)
            args = ["--cache-dir", str(cwd / "cache")] if name == "prepare_throughput" else []  # not ~/.cache
            futures[name] = pool.submit(smoke, name, cwd, *args, timeout=SMOKES[name])
        yield futures


def test_prepare_throughput(smokes):
    summary = smokes["prepare_throughput"].result()
    assert summary["rows"] == 16 and summary["floor_rows"] == 8 and summary["cores"] == 1
    assert positive(summary["samples_per_s"]) and positive(summary["floor_samples_per_s_single_core"])
    assert positive(summary["efficiency"])


def test_serve_load(smokes):
    summary = smokes["serve_load"].result()
    assert summary["clients"] == 2 and summary["max_tokens"] == 2
    for phase in ("concurrent", "sequential"):
        assert summary[phase]["requests"] == 4 and summary[phase]["errors"] == 0
        assert positive(summary[phase]["rps"]) and positive(summary[phase]["p50_s"])
        assert summary[phase]["p50_s"] <= summary[phase]["p99_s"]
    assert positive(summary["speedup"])


def test_eval_throughput(smokes):
    summary = smokes["eval_throughput"].result()
    assert summary["prompts"] == 8  # 4 questions, each with its image and blind
    assert summary["actors"] == 1 and summary["max_new_tokens"] == 2
    assert positive(summary["in_process_prompts_per_s"]) and positive(summary["endpoint_prompts_per_s"])
    assert summary["agreement"] == 1.0  # one generation path: the endpoint answers as the in-process actors do
    assert len(summary["accuracy"]) == 2 and all(fraction(a) for a in summary["accuracy"])


def test_train_step(smokes):
    summary = smokes["train_step"].result()
    assert summary["steps"] == 4 and summary["warmup"] == 1
    assert positive(summary["project_tokens_per_s"]) and positive(summary["bare_tokens_per_s"])
    assert positive(summary["ratio"])


def test_train_memory(smokes):
    summary = smokes["train_memory"].result()
    assert summary["rows"] == 32 and summary["steps"] == 4
    assert positive(summary["rss_gib_small"]) and positive(summary["rss_gib_large"]) and positive(summary["ratio"])
    assert fraction(summary["data_wait_fraction"])


def test_serve_vllm_load(smokes):
    if not os.path.exists(VLLM_PYTHON):
        pytest.fail(f"{VLLM_PYTHON} is missing: `make readers` (part of `make test`) builds it")
    summary = smokes["serve_vllm_load"].result()
    assert summary["clients"] == 2 and summary["requests"] == 4
    assert "default" not in summary  # the smoke runs the path nothing else deploys (the default: test_serve_vllm.py)
    path = summary["direct_streaming"]
    for server in ("vllm_server", "llava_ray"):
        assert path[server]["errors"] == 0 and positive(path[server]["rps"])
    assert len(path["rounds_ratio"]) == 1 and positive(path["ratio"]) and summary["ratio"] == path["ratio"]
