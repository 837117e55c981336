"""Where base models come from: storage URIs and paths as given; hub ids from the workflow's mirror, or fetched from
the hub once per run into the run directory (the hub itself cannot be reached here: its download is the one mock)."""
import json
import os

import pytest

from llava_core.model import base_models


@pytest.mark.parametrize("name, hub", [("lmsys/vicuna-7b-v1.5", True), ("openai/clip-vit-large-patch14-336", True),
                                       ("s3://bucket/hub/lmsys/vicuna-7b-v1.5", False),
                                       ("data/quickstart/models/llm", False), ("./models/llm", False),
                                       ("/abs/llm", False)])
def test_hub_ids_are_told_from_paths(name, hub):
    assert base_models.is_hub_id(name) is hub


def test_paths_stay_and_hub_ids_come_from_the_mirror(tmp_path):
    assert base_models.base_model_location("s3://b/llm", "s3://m/hub", "s3://b/runs/r") == "s3://b/llm"
    assert base_models.base_model_location("./models/llm", "", str(tmp_path)) == os.path.abspath("models/llm")
    assert base_models.base_model_location("lmsys/vicuna-7b-v1.5", "s3://m/hub", "s3://b/runs/r") == \
        "s3://m/hub/lmsys/vicuna-7b-v1.5"


def test_a_hub_id_is_fetched_once_per_run_into_the_run_directory(tmp_path, monkeypatch):
    import huggingface_hub

    downloads = []

    def fake_snapshot_download(repo_id, local_dir, allow_patterns):
        downloads.append(repo_id)
        for name in ("config.json", "tokenizer.model", "pytorch_model-00001-of-00002.bin"):
            with open(os.path.join(local_dir, name), "w") as f:
                f.write(name)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    run_dir = str(tmp_path / "runs" / "r")
    target = os.path.join(run_dir, "base_models", "lmsys", "vicuna-7b-v1.5")
    base_models.fetch_from_hub("lmsys/vicuna-7b-v1.5", target)  # what the run's one Ray task does
    assert downloads == ["lmsys/vicuna-7b-v1.5"]
    assert json.load(open(os.path.join(target, base_models.FETCHED_MARKER)))["files"] == \
        ["config.json", "pytorch_model-00001-of-00002.bin", "tokenizer.model"]

    import ray

    def no_second_fetch(*args, **kwargs):
        raise AssertionError("fetched again although the run directory holds the model")
    monkeypatch.setattr(ray, "remote", no_second_fetch)
    assert base_models.base_model_location("lmsys/vicuna-7b-v1.5", "", run_dir) == target
