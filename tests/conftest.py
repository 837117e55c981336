"""Shared fixtures: one Ray instance per test session, and tiny models built from configs (nothing downloaded)."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# S3 credentials reach Ray workers the way a cluster gives them: in the environment every process starts with (on
# Kubernetes, variables from a secret on every pod), never through a runtime_env. The tests' S3 server (moto) takes
# any key; these are set before the session's Ray starts, so its workers inherit them.
# The same way, an API key the serve stage's tests name with `serve.api_key_env`.
TEST_API_KEY_ENV = "LLAVA_RAY_TEST_API_KEY"
for _name, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                      (TEST_API_KEY_ENV, "k3y-from-the-environment")):
    os.environ.setdefault(_name, _value)


# The test tiers (pyproject's markers; docs/development.md defines them). A test is in exactly one: its closest
# tier mark (its own, else its module's `pytestmark`); without one, integration if it starts Ray, else unit.
TIERS = ("unit", "integration", "slow")
STARTS_RAY = "ray_session"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, which reads every mark of a test and of its module
def pytest_collection_modifyitems(config, items):
    tiers = {}
    for item in items:
        closest = next((mark.name for mark in item.iter_markers() if mark.name in TIERS), None)
        tiers[item] = closest or ("integration" if STARTS_RAY in item.fixturenames else "unit")
        if tiers[item] == "unit" and STARTS_RAY in item.fixturenames:
            raise pytest.UsageError(f"{item.nodeid} is marked unit but starts Ray ({STARTS_RAY}): mark it "
                                    "integration or slow")
    # Leave each test its one tier mark only, so that `-m integration` does not take a module's slow exceptions.
    for node in {parent for item in items for parent in item.listchain()}:
        node.own_markers[:] = [mark for mark in node.own_markers if mark.name not in TIERS]
    for item, tier in tiers.items():
        item.add_marker(tier)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from llava_core.logs import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2, log_to_driver=True)
    yield ray
    # Ray is shut down at interpreter exit; tearing it down here would break fixtures finalised after this one.


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small synthetic dataset in the official LLaVA layout plus tiny base models saved in HF format."""
    from llava_core.quickstart import standins, synthetic

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
    """An untrained LLaVA as the stages export it (hub key layout, processor, chat template), for engine and serving
    tests."""
    import torch

    from llava_core.model.build import assemble
    from llava_core.train.save import save_hf_model

    out = str(tmp_path_factory.mktemp("tiny_llava"))
    # The new projector draws from torch's global generator: seeded, the model (and every answer the tests compare)
    # is the same whichever tests ran first.
    torch.manual_seed(0)
    model, processor = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    save_hf_model(model, processor, out, torch.float32)
    return out
