"""Shared fixtures: one Ray instance per test session, and tiny models built from configs (nothing downloaded)."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=True, configure_logging=False)
    yield ray
    # Ray is shut down at interpreter exit; tearing it down here would break fixtures finalised after this one.


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small synthetic dataset in the official LLaVA layout plus tiny base models saved in HF format."""
    from llava_core.data import synthetic
    from llava_core.model import standins

    root = str(tmp_path_factory.mktemp("tiny_dataset"))
    paths = synthetic.generate(root, align_rows=64, instruct_rows=64, eval_questions=16, text_only_rows=4, seed=1)
    rows = json.load(open(paths["align"])) + json.load(open(paths["instruct"]))
    corpus = [turn["value"] for row in rows for turn in row["conversations"]]
    paths.update(vision=os.path.join(root, "models", "vision"), llm=os.path.join(root, "models", "llm"))
    standins.save_tiny_models(paths["vision"], paths["llm"], corpus, standins.TinyModelConfig())
    paths["root"] = root
    return paths


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_dataset, tmp_path_factory):
    """An untrained LLaVA in HF export layout (model + processor + chat template), for engine and serving tests."""
    from llava_core.model.build import assemble_llava

    out = str(tmp_path_factory.mktemp("tiny_llava"))
    model, processor = assemble_llava(tiny_dataset["vision"], tiny_dataset["llm"])
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
