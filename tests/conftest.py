"""Shared fixtures: one Ray instance per test session, and tiny models built from configs (nothing downloaded)."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Two per-run costs of Ray Train's controller that only a suite of ~40 short training stages feels (~2.5 s of a ~17 s
# stage start, docs/results.md 2026-12-07 evening): it polls its workers every 2 s (a finished stage is
# noticed up to 2 s late) and starts an actor that watches for cloud spot-instance preemption. Users keep Ray's
# defaults; these reach every controller of the session through the driver's environment (ENV_VARS_TO_PROPAGATE).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# S3 credentials reach Ray workers the way a cluster gives them: in the environment every process starts with (on
# Kubernetes, variables from a secret on every pod), never through a runtime_env. The tests' S3 server (moto) takes
# any key; these are set before the session's Ray starts, so its workers inherit them.
# The same way, an API key the serve stage's tests name with `serve.api_key_env`.
TEST_API_KEY_ENV = "LLAVA_RAY_TEST_API_KEY"
for _name, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                      (TEST_API_KEY_ENV, "k3y-from-the-environment")):
    os.environ.setdefault(_name, _value)


# The test tiers (pyproject's markers; docs/development.md defines them). A test's tier is the folder its file is in,
# tests/<tier>/, and this hook marks it so: a test file outside those folders is a collection error, and a tier mark
# written in a test file is refused (the folder alone says it, so a test cannot be in two tiers).
TIERS = ("unit", "integration", "end_to_end")
STARTS_RAY = "ray_session"
TESTS = os.path.dirname(os.path.abspath(__file__))

# Fixtures that the tiers of one subject share (tests/unit/test_x.py and tests/integration/test_x.py) live beside that
# subject's helpers in tests/<x>_helpers.py; loaded here, a test finds them by name as it finds this file's.
pytest_plugins = ["tests.hostile_rows_helpers", "tests.prepare_helpers", "tests.serve_stage_helpers",
                  "tests.storage_helpers", "tests.streaming_helpers", "tests.video_rows_helpers"]


def tier_of(path) -> str | None:
    """The tier of a file under tests/ (`unit` for tests/unit/...); None outside the tier folders."""
    parts = os.path.relpath(path, TESTS).split(os.sep)
    return parts[0] if len(parts) > 1 and parts[0] in TIERS else None


class OutsideTheTiers(pytest.File):
    def collect(self):
        raise self.CollectError("a test file goes in the folder of its tier: tests/unit, tests/integration or "
                                "tests/end_to_end")


def pytest_pycollect_makemodule(module_path, parent):
    """A test file outside the tier folders is collected as an error instead of a module."""
    if tier_of(module_path) is None:
        return OutsideTheTiers.from_parent(parent, path=module_path)
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        written = [mark.name for mark in item.iter_markers() if mark.name in TIERS]
        if written:
            raise pytest.UsageError(f"{item.nodeid} is marked {', '.join(written)}: the folder a test is in is its "
                                    "tier, remove the mark")
        tier = tier_of(item.path)
        if tier == "unit" and STARTS_RAY in item.fixturenames:
            raise pytest.UsageError(f"{item.nodeid} is in tests/unit but starts Ray ({STARTS_RAY}): move it to "
                                    "tests/integration or tests/end_to_end")
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
