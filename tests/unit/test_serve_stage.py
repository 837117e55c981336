"""The workflow's serve stage without Serve: the demo question for a workflow without an eval set (from the instruct
data, read only up to its first image row), the readiness wait sized from the export, the status line, the replica's
key (the stage deployed: tests/integration/test_serve_stage.py)."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from llava_core.config import DatasetSettings, ServeSettings, Workflow
from llava_core.demo import instruct_question
from llava_core.serve import readiness
from llava_core.serve.client import chat_request, image_mime
from tests.serve_stage_helpers import QUESTION, encoded


def test_the_demo_question_is_the_first_image_rows_first_turn(instruct_data, tmp_path):
    dataset = DatasetSettings(path=instruct_data["path"], image_folder=instruct_data["image_folder"])
    question = instruct_question(dataset)
    assert question.text == QUESTION
    assert question.images == [instruct_data["image"]]
    assert question.origin == f"{instruct_data['path']} row 1 (blue.jpg)"

    # Read as a stream up to that row: a file whose end is cut off (as a half-uploaded 1 GB file would be) still works.
    text = open(instruct_data["path"]).read()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    assert instruct_question(DatasetSettings(path=str(cut), image_folder=dataset.image_folder)).text == QUESTION


def test_with_an_eval_set_the_demo_asks_its_first_question(instruct_data, tmp_path):
    from llava_core.config import EvalSetSettings, EvaluateSettings
    from llava_core.demo import demo_question
    from llava_core.eval.layouts import SHORT_ANSWER

    questions = tmp_path / "pope.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": "blue.jpg", "text": f"Is there a cat {i}?",
                                             "label": "no"}) + "\n" for i in range(3)))
    folder = instruct_data["image_folder"]
    pope = EvalSetSettings(layout="pope", questions=str(questions), image_folder=folder)
    workflow = Workflow(datasets={"instruct": DatasetSettings(path=instruct_data["path"], image_folder=folder)},
                        evaluate=EvaluateSettings(sets={"pope": pope}))
    question = demo_question(workflow)
    assert question.text == f"Is there a cat 0?\n{SHORT_ANSWER}"  # as evaluate asks it
    assert question.images == [instruct_data["image"]]


def test_images_are_sent_in_their_own_format():
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    assert image_mime(encoded(image, "JPEG")) == "image/jpeg"
    assert image_mime(encoded(image, "PNG")) == "image/png"
    url = chat_request("m", "Hi?", [encoded(image, "WEBP")])["messages"][0]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/webp;base64,")


def test_ready_timeout_grows_with_the_weight_files():
    listing = [("config.json", 10**6, 0), ("model-00001-of-00002.safetensors", 5 * 10**9, 0),
               ("model-00002-of-00002.safetensors", 2 * 10**9, 0), ("adapter/adapter_model.bin", 10**9, 0),
               ("tokenizer.json", 3 * 10**6, 0)]
    assert readiness.weight_bytes(listing) == 8 * 10**9
    assert readiness.derived_timeout_s(8 * 10**9) == 120 + 8 * 60
    assert readiness.derived_timeout_s(0) == 120


def test_ready_timeout_setting_wins_and_a_bad_one_is_refused(tiny_llava_dir):
    from llava_core.config import WorkflowError, serve_settings_from_dict

    weights = os.path.getsize(os.path.join(tiny_llava_dir, "model.safetensors"))
    assert readiness.ready_timeout_s(ServeSettings(), tiny_llava_dir) == pytest.approx(120 + 60 * weights / 1e9)
    assert readiness.ready_timeout_s(ServeSettings(ready_timeout_s=900), tiny_llava_dir) == 900
    with pytest.raises(WorkflowError, match="serve.ready_timeout_s: must be greater than 0"):
        serve_settings_from_dict({"ready_timeout_s": -5})


def test_status_line_names_the_replicas_and_their_message():
    from ray.serve.schema import (
        ApplicationStatus,
        ApplicationStatusOverview,
        DeploymentStatus,
        DeploymentStatusOverview,
        DeploymentStatusTrigger,
        ReplicaState,
        ServeStatus,
    )

    deployment = DeploymentStatusOverview(
        status=DeploymentStatus.UPDATING, status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_STARTED,
        replica_states={ReplicaState.STARTING: 1, ReplicaState.RUNNING: 0},
        message="Deployment 'LlavaServer' has 1 replica that has taken more than 30s to be scheduled: resources "
                "{'CPU': 1.0, 'GPU': 1.0} are not available")
    app = ApplicationStatusOverview(status=ApplicationStatus.DEPLOYING, message="", last_deployed_time_s=0.0,
                                    deployments={"LlavaServer": deployment})
    line = readiness.describe_status(ServeStatus(applications={"llava": app}), "llava")
    assert line == ("application llava: DEPLOYING; deployment LlavaServer: UPDATING, 1 replica STARTING: Deployment "
                    "'LlavaServer' has 1 replica that has taken more than 30s to be scheduled: resources "
                    "{'CPU': 1.0, 'GPU': 1.0} are not available")
    assert readiness.describe_status(ServeStatus(), "llava") == "application llava: not deployed"


def test_a_replica_without_its_key_does_not_start(tmp_path):
    """Fail closed: a key named but missing in the replica's environment is a replica that never serves."""
    from llava_core.secrets import SecretMissing
    from llava_core.serve.app import replica_api_key

    with pytest.raises(SecretMissing, match="LLAVA_RAY_NOT_SET_ANYWHERE is not set"):
        replica_api_key(ServeSettings(api_key_env="LLAVA_RAY_NOT_SET_ANYWHERE"))
    with pytest.raises(SecretMissing, match="cannot read /nonexistent/key"):
        replica_api_key(ServeSettings(api_key_file="/nonexistent/key"))
    empty = tmp_path / "key"
    empty.write_text("\n")
    with pytest.raises(SecretMissing, match="is empty"):
        replica_api_key(ServeSettings(api_key_file=str(empty)))
    assert replica_api_key(ServeSettings()) is None  # no key named: an open endpoint, as configured
