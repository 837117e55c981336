"""The docs: the site builds with `mkdocs build --strict`, the README stays a five-minute read whose links into docs/
resolve, and the README's commands run as written (the endpoint examples against a live endpoint)."""
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

from tests.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
README_MAX_LINES = 200
SEVEN_B = os.path.join(ROOT, "workflows", "llava-v1.5-7b.yaml")
# What the README's endpoint examples ask for: the quickstart's served name (workflows/quickstart.yaml's
# serve.model_name), its address and an image of the quickstart's data.
SERVED_NAME = "llava-quickstart"
WRITTEN_URL = "http://127.0.0.1:8000"
EXAMPLE_IMAGE = os.path.join("data", "quickstart", "images", "eval_000000.png")


def readme() -> str:
    with open(README) as f:
        return f.read()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of a markdown text."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)]


def the_block(language: str, containing: str) -> str:
    found = [body for lang, body in fenced_blocks(readme()) if lang == language and containing in body]
    assert len(found) == 1, f"the README has {len(found)} {language} blocks with {containing!r}"
    return found[0]


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(args: list[str], cwd: str = ROOT) -> subprocess.CompletedProcess:
    """`llava-ray ARGS` through the console script's entry, with this checkout's code."""
    return subprocess.run([sys.executable, "-m", "llava_core.cli", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


# --- the site -----------------------------------------------------------------------------------------------------


def mkdocs_build(root: str, site_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", site_dir],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_strictly(tmp_path):
    built = mkdocs_build(ROOT, str(tmp_path / "site"))
    assert built.returncode == 0 and "WARNING" not in built.stderr, built.stderr
    for page in ("index.html", "reference/workflow/index.html", "results/index.html", "troubleshooting/index.html"):
        assert (tmp_path / "site" / page).is_file()


@pytest.mark.parametrize("spoil, named", [
    (lambda docs: (docs / "index.md").open("a").write("\n[gone](no-such-page.md)\n"), "no-such-page.md"),
    (lambda docs: (docs / "index.md").open("a").write("\n[gone](data.md#no-such-section)\n"), "no-such-section"),
    (lambda docs: (docs / "orphan.md").write_text("# Not in the nav\n"), "orphan.md"),
], ids=["broken link", "broken anchor", "page not in the nav"])
def test_the_strict_build_fails_on_a_warning(tmp_path, spoil, named):
    copy = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "docs"), copy / "docs")
    shutil.copy(os.path.join(ROOT, "mkdocs.yml"), copy / "mkdocs.yml")
    spoil(copy / "docs")
    built = mkdocs_build(str(copy), str(tmp_path / "site"))
    assert built.returncode != 0 and named in built.stderr, built.stderr


# --- the README ---------------------------------------------------------------------------------------------------


def test_the_readme_is_a_five_minute_read():
    assert len(readme().splitlines()) <= README_MAX_LINES


def test_every_readme_link_into_docs_resolves():
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        nav = json.dumps(yaml.safe_load(f)["nav"])
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)", readme())
    assert len(set(links)) >= 10  # the tour's five answers and the site's pages
    for link in links:
        assert os.path.isfile(os.path.join(ROOT, link)), link
        assert json.dumps(link.removeprefix("docs/")) in nav, f"{link} is not in mkdocs.yml's nav"


def test_the_files_the_readme_names_exist():
    named = set(re.findall(r"\b((?:cluster|workflows|jobs|benchmarks|llava_core)/[\w./-]*\w)", readme()))
    assert {"cluster/rayjob.yaml", "workflows/llava-v1.5-7b.yaml", "jobs/run_workflow.py"} <= named
    assert [path for path in sorted(named) if not os.path.exists(os.path.join(ROOT, path))] == []


def validate_lines() -> list[str]:
    return [line.strip() for _, body in fenced_blocks(readme()) for line in body.splitlines()
            if line.strip().startswith("llava-ray validate ")]


def test_the_readme_shows_validate():
    assert len(validate_lines()) >= 3


@pytest.mark.integration  # a CLI run of a few seconds each, no Ray
@pytest.mark.parametrize("line", validate_lines())
def test_each_readme_validate_command_passes_as_written(line):
    done = run_cli(shlex.split(line, comments=True)[1:])
    assert done.returncode == 0 and ": valid;" in done.stdout, done.stdout + done.stderr


def merged(base: dict, snippet: dict) -> dict:
    """The workflow with the snippet pasted in: each entry of its sections (a dataset) replaces the recipe's."""
    return {**base, **{key: {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict)
                       else value for key, value in snippet.items()}}


@pytest.mark.integration
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


def at(example: str, url: str) -> str:
    assert WRITTEN_URL in example
    return example.replace(WRITTEN_URL, url)


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
