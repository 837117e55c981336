"""`serve.engine: vllm` live: Ray's `ray.serve.llm` app serving an export with vLLM's CPU build, its replicas in the
vLLM environment (`serve.vllm.python`: `.venv-vllm`, which `make readers` builds), deployed from this Ray and this
Python (which has no vLLM) by the same `deploy` the workflow's serve stage and `llava-ray serve` call. Asked with the
official `openai` client as the transformers engine is (tests/integration/test_serve.py): text, an image, streaming, an
unknown model; its greedy answers are our engine's; a request without max_tokens is not cut at a length the export
set."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from typing import NamedTuple

import openai
import pytest
from PIL import Image

from llava_core.config import DatasetSettings, Workflow
from llava_core.inference.decoding import DecodingParams
from tests.other_readers import VLLM_PYTHON
from tests.ports import free_port
from tests.serve_requests import image_part, png_bytes

# vLLM's CPU engine, small: in the replica's own process (starts in seconds), 1 GiB of KV cache, threads unbound.
CPU_ENGINE = {"python": VLLM_PYTHON,
              "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
              "engine_kwargs": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True}}


def vllm_settings(**changes):
    from llava_core.config import serve_settings_from_dict

    return serve_settings_from_dict({"engine": "vllm", "port": free_port(), "gpus_per_replica": 0,
                                     "vllm": CPU_ENGINE, **changes})


class Served(NamedTuple):
    url: str
    model: str  # the name `llava-ray serve` serves the export by without --model-name: its folder's
    printed: str  # what it printed


@pytest.fixture(scope="module")
def server(ray_session, tiny_llava_dir):
    """`llava-ray serve EXPORT --set engine=vllm ...` as a user types it: the CLI's settings and its deploy, on this
    test session's Ray (its `ray.init` is the one thing left out) and without blocking until Ctrl-C. One vLLM start-up
    (~1 min on 2 cores) serves every test of the module but the serve stage's, which deploys its own."""
    from llava_core import cli
    from llava_core.serve.client import shutdown
    from llava_core.serve.deploy_config import default_model_name

    if not os.path.exists(VLLM_PYTHON):
        pytest.fail(f"{VLLM_PYTHON} is missing: `make readers` (part of `make test`) builds it")
    port, printed = free_port(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(cli, "init_ray", lambda: None)
        patch.setattr("llava_core.serve.client.serve_until_interrupted", lambda: None)
        code = cli.main(["serve", tiny_llava_dir, "--port", str(port), "--set", "engine=vllm",
                         "--set", "gpus_per_replica=0", "--set", f"vllm.python={VLLM_PYTHON}",
                         "--set", f"vllm.engine_kwargs={json.dumps(CPU_ENGINE['engine_kwargs'])}",
                         "--set", f"vllm.env_vars={json.dumps(CPU_ENGINE['env_vars'])}"])
    assert code == 0, printed.getvalue()
    yield Served(f"http://127.0.0.1:{port}", default_model_name(tiny_llava_dir), printed.getvalue())
    shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    """Our engine on the same export (the endpoint's and the evaluation's generation path), loaded once."""
    from llava_core.inference.engine import GenerationEngine

    return GenerationEngine(tiny_llava_dir)


def our_completion(engine, question: str, images: list, max_tokens: int):
    """Our engine's greedy completion of the same question."""
    from llava_core.inference.engine import GenerationRequest

    parts = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    decoding = DecodingParams(max_tokens=max_tokens, temperature=0)
    return engine.generate([GenerationRequest([{"role": "user", "content": parts}], images, decoding)])[0]


def same_answer(vllm_text: str, completion) -> bool:
    """The same text, but for an unfinished UTF-8 sequence at the very end (an untrained model's byte tokens): our
    stream shows it as U+FFFD, vLLM's detokenizer holds it back; and for the space of a first token that starts a
    word (sentencepiece's "▁detailed"): vLLM decodes it after the prompt and keeps it, transformers' decode of the
    answer alone drops it."""
    return vllm_text.rstrip("\ufffd").removeprefix(" ") == completion.text.rstrip("\ufffd")


def test_text_image_and_streamed_answers_are_our_engines(server, client, engine):
    image = Image.new("RGB", (56, 40), (200, 40, 40))
    question = "What colour is the shape?"
    plain = client.chat.completions.create(model=server.model, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": question}])
    with_image = client.chat.completions.create(
        model=server.model, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [image_part(png_bytes(image)), {"type": "text", "text": question}]}])
    stream = client.chat.completions.create(
        model=server.model, max_tokens=8, temperature=0, stream=True,
        messages=[{"role": "user", "content": [image_part(png_bytes(image)), {"type": "text", "text": question}]}])
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    for answer, ours in ((plain, our_completion(engine, question, [], 8)),
                         (with_image, our_completion(engine, question, [image], 8))):
        assert same_answer(answer.choices[0].message.content, ours)
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == \
            (ours.prompt_tokens, ours.completion_tokens)
    assert streamed == with_image.choices[0].message.content
    assert with_image.usage.prompt_tokens >= plain.usage.prompt_tokens + 64  # the image is its 64 tokens


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])


def test_a_request_without_max_tokens_is_not_cut_by_the_export(server, client):
    """vLLM takes generation_config.json's values as request defaults: the export sets no answer length, so a
    request that sets none runs to the end of the context (here forced past any end of sequence)."""
    answer = client.chat.completions.create(model=server.model, temperature=0, extra_body={"ignore_eos": True},
                                            messages=[{"role": "user", "content": "Describe the shape."}])
    assert answer.usage.completion_tokens > 64 and answer.choices[0].finish_reason == "length"


def test_llava_ray_serve_with_engine_vllm_answers_the_openai_client(server, client, engine):
    """What `llava-ray serve` (the module's server) printed: the model under its export folder's name, which then
    answers an image as our engine does."""
    assert f"serving '{server.model}' at {server.url}/v1/chat/completions" in server.printed
    image = Image.new("RGB", (48, 64), (40, 200, 40))
    answer = client.chat.completions.create(
        model=server.model, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [image_part(png_bytes(image)), {"type": "text", "text": "What shape?"}]}])
    ours = our_completion(engine, "What shape?", [image], 8)
    assert same_answer(answer.choices[0].message.content, ours)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (ours.prompt_tokens, ours.completion_tokens)


def test_the_workflows_serve_stage_serves_with_vllm(server, engine, tiny_llava_dir, tmp_path):
    """The serve stage of a workflow with `serve.engine: vllm` deploys vLLM (in place of the module's app, on its
    port: one Serve, one set of HTTP options) and asks it the demo question. Last in the module: it ends the
    module's app."""
    from llava_core.serve.client import shutdown
    from llava_core.workflow import RunContext, compute_hashes, stage_serve

    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_llava_dir, os.path.join(run_dir, "export"))
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes(Image.new("RGB", (56, 40), (200, 40, 40))))
    data = tmp_path / "instruct.json"
    data.write_text(json.dumps([{"id": "1", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]}]))
    workflow = Workflow(name="vllm-stage", datasets={"instruct": DatasetSettings(path=str(data),
                                                                                 image_folder=str(tmp_path))},
                        serve=vllm_settings(model_name="", port=int(server.url.rsplit(":", 1)[1])))
    ctx = RunContext(workflow, run_dir, "", "", hashes=compute_hashes(workflow))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            demo = stage_serve(ctx)
    finally:
        shutdown()
    ours = our_completion(engine, "What colour is the shape?", [Image.open(image).convert("RGB")],
                          demo["max_tokens"])
    assert demo["model"] == "vllm-stage" and demo["usage"]["prompt_tokens"] == ours.prompt_tokens
    assert same_answer(demo["answer"], ours)
