"""The workflow's serve stage deployed (one Serve instance, by the stage itself): the demo question it asks, the key it
reads from the environment, and a timeout error that says what Serve is doing."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import pytest
import requests

from llava_core.config import DatasetSettings, ServeSettings, Workflow
from llava_core.serve import readiness
from llava_core.serve.client import chat_request
from tests.conftest import TEST_API_KEY_ENV
from tests.ports import free_port
from tests.serve_stage_helpers import QUESTION


@pytest.fixture(scope="module")
def served_demo(ray_session, tiny_llava_dir, instruct_data, tmp_path_factory):
    """The serve stage of a workflow with no eval set, on a run directory holding an export."""
    from llava_core.serve.client import shutdown
    from llava_core.workflow import RunContext, compute_hashes, stage_serve

    run_dir = str(tmp_path_factory.mktemp("run"))
    shutil.copytree(tiny_llava_dir, os.path.join(run_dir, "export"))
    instruct = DatasetSettings(path=instruct_data["path"], image_folder=instruct_data["image_folder"])
    # The key comes from the environment every process started with, as pods get it from a secret.
    serve = ServeSettings(port=free_port(), api_key_env=TEST_API_KEY_ENV)
    workflow = Workflow(name="no-eval-set", datasets={"instruct": instruct}, serve=serve)
    assert not workflow.evaluate.all_sets()
    ctx = RunContext(workflow, run_dir, "", "", hashes=compute_hashes(workflow))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = stage_serve(ctx)
    yield ctx, result, printed.getvalue()
    shutdown()


def test_serve_stage_without_an_eval_set_asks_the_instruct_datas_image_question(served_demo, instruct_data):
    ctx, result, _ = served_demo
    demo = json.load(open(os.path.join(ctx.stage_dir("serve"), "demo.json")))
    assert demo == result
    assert demo["question"] == QUESTION and demo["image"].endswith("row 1 (blue.jpg)")
    assert isinstance(demo["answer"], str)

    # The same question about the same JPEG, sent by hand: the same answer and the same prompt, image tokens included.
    key = {"Authorization": f"Bearer {os.environ[TEST_API_KEY_ENV]}"}
    asked = requests.post(f"{demo['url']}/v1/chat/completions", timeout=60, headers=key,
                          json=chat_request(demo["model"], QUESTION, [instruct_data["image"]])).json()
    text_only = requests.post(f"{demo['url']}/v1/chat/completions", timeout=60, headers=key,
                              json=chat_request(demo["model"], QUESTION, [])).json()
    assert demo["answer"] == asked["choices"][0]["message"]["content"]
    assert demo["usage"]["prompt_tokens"] == asked["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"]


def test_the_key_is_read_from_the_environment_and_never_printed(served_demo):
    ctx, result, printed = served_demo
    key = os.environ[TEST_API_KEY_ENV]
    body = chat_request(result["model"], QUESTION, [])
    assert requests.post(f"{result['url']}/v1/chat/completions", json=body, timeout=60).status_code == 401
    assert f'-H "Authorization: Bearer ${TEST_API_KEY_ENV}"' in printed  # the variable's name, for the reader's shell
    assert key not in printed and key not in json.dumps(result)


def test_running_out_of_time_says_what_serve_is_doing(served_demo):
    from llava_core.serve.deploy_config import APP_NAME

    nowhere = f"http://127.0.0.1:{free_port()}"  # Serve runs, but nothing answers here
    with pytest.raises(RuntimeError) as error:
        readiness.wait_until_ready(nowhere, APP_NAME, timeout_s=1.0)
    message = str(error.value)
    assert f"{nowhere}/ready did not answer 200 within 1s" in message
    assert "application llava: RUNNING; deployment LlavaServer: HEALTHY, 1 replica RUNNING" in message
    assert "no answer" in message
