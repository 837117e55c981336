"""The README's commands run as written: its `llava-ray validate` lines, its YAML snippet merged over the 7B workflow,
and the endpoint examples against a live endpoint. The site's build and the README's shape: tests/unit/test_docs.py."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.docs_helpers import EXAMPLE_IMAGE, ROOT, SERVED_NAME, at, fenced_blocks, readme, the_block, validate_lines
from tests.ports import free_port
from tests.workflow_checks_helpers import OFFLINE_AWS

SEVEN_B = os.path.join(ROOT, "workflows", "llava-v1.5-7b.yaml")


def cli_env() -> dict:
    return {**os.environ, **OFFLINE_AWS, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(args: list[str], cwd: str = ROOT) -> subprocess.CompletedProcess:
    """`llava-ray ARGS` through the console script's entry, with this checkout's code."""
    return subprocess.run([sys.executable, "-m", "llava_core.cli", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


# no Ray, but a CLI run of a few seconds each: integration
@pytest.mark.parametrize("line", validate_lines())
def test_each_readme_validate_command_passes_as_written(line):
    done = run_cli(shlex.split(line, comments=True)[1:])
    assert done.returncode == 0 and ": valid;" in done.stdout, done.stdout + done.stderr


def merged(base: dict, snippet: dict) -> dict:
    """The workflow with the snippet pasted in: each entry of its sections (a dataset) replaces the recipe's."""
    return {**base, **{key: {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict)
                       else value for key, value in snippet.items()}}


def test_the_readme_data_snippet_is_a_valid_part_of_the_7b_workflow(tmp_path):
    snippets = [yaml.safe_load(body) for lang, body in fenced_blocks(readme()) if lang == "yaml"]
    assert len(snippets) == 1 and snippets[0]["storage"].startswith("s3://")
    with open(SEVEN_B) as f:
        workflow = merged(yaml.safe_load(f), snippets[0])
    assert workflow["datasets"]["instruct"] == snippets[0]["datasets"]["instruct"]
    assert workflow["datasets"]["align"]["path"].startswith("s3://my-bucket/")  # the recipe's, kept
    path = tmp_path / "my-workflow.yaml"
    path.write_text(yaml.safe_dump(workflow))
    done = run_cli(["validate", str(path)])
    assert done.returncode == 0 and ": valid; run directory s3://my-bucket/llava-runs/" in done.stdout, \
        done.stdout + done.stderr


# --- the endpoint examples, against a live endpoint ----------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint(ray_session, tiny_llava_dir):
    """The session's tiny export served as the quickstart is (its name), on a free port: 8000 may be taken on a
    shared machine, so the examples' address is the one thing the tests change."""
    from llava_core.config import ServeSettings
    from llava_core.serve.client import deploy, shutdown

    url = deploy(tiny_llava_dir, ServeSettings(port=free_port()), SERVED_NAME)
    yield url
    shutdown()


@pytest.fixture(scope="module")
def example_dir(tiny_dataset, tmp_path_factory):
    """A working directory holding the image the examples send, where the quickstart writes it."""
    root = tmp_path_factory.mktemp("readme-examples")
    os.makedirs(root / os.path.dirname(EXAMPLE_IMAGE))
    shutil.copy(os.path.join(tiny_dataset["root"], "images", "eval_000000.png"), root / EXAMPLE_IMAGE)
    return str(root)


def test_the_readme_curl_example_answers(endpoint, example_dir):
    script = at(the_block("bash", "curl "), endpoint)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=example_dir, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["object"] == "chat.completion" and reply["model"] == SERVED_NAME
    assert isinstance(reply["choices"][0]["message"]["content"], str) and reply["usage"]["completion_tokens"] >= 1


def test_the_readme_python_example_answers_plain_and_streamed(endpoint, example_dir):
    script = at(the_block("python", "from openai import OpenAI"), endpoint)
    env = {key: value for key, value in os.environ.items() if key != "LLAVA_RAY_API_KEY"}
    done = subprocess.run([sys.executable, "-c", script], cwd=example_dir, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    printed = re.fullmatch(r"(.*) (CompletionUsage\(.*\))\n(.*)", done.stdout, re.S)
    assert printed, done.stdout
    plain, usage, streamed = printed.groups()
    # The example samples (no temperature: OpenAI's default 1), so the two answers are each the model's own draw.
    assert plain and re.search(r"completion_tokens=[1-9]", usage)
