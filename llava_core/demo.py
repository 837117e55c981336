"""The serve stage of a workflow: deploy the export, prove it answers with one real request, and say how to call it.

It stands beside the stage runner (workflow.py), above `serve/` and `eval/`: it asks the question evaluate would ask.

The demo asks the first question of the workflow's primary eval set; a workflow without one (the full-size ones)
asks the first image row of its instruct data instead, read from the start of the file without loading the rest.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import time
from dataclasses import dataclass

from llava_core import storage
from llava_core.config import DatasetSettings, EvalSetSettings, Workflow, dataset_sources
from llava_core.data import formats
from llava_core.data.images import read_image_bytes
from llava_core.data.preference import read_preference_row
from llava_core.data.sources import iter_rows
from llava_core.secrets import shell_reference
from llava_core.serve.client import auth_line, chat_request, deploy, image_mime, post_chat


@dataclass
class DemoQuestion:
    text: str
    images: list[bytes]
    origin: str  # where the image was read: the log line and demo.json say it


def demo_question(w: Workflow) -> DemoQuestion:
    sets = w.evaluate.all_sets()
    if sets:
        return eval_question(sets[w.evaluate.primary_set() or next(iter(sets))])
    last = getattr(w, w.training_stages()[-1])  # the model's last training data: instruct's, or preference's
    return instruct_question(w.datasets[last.dataset], w.prepare.allow_paths_outside_image_folder)


def eval_question(s: EvalSetSettings) -> DemoQuestion:
    from llava_core.eval.layouts import load_eval_set

    item = load_eval_set(dataclasses.replace(s, limit=1))[0]  # asked as evaluate asks it, instruction included
    image = base64.b64decode(item.image_b64) if item.image_b64 else storage.read_bytes(item.image_path)
    return DemoQuestion(item.text, [image], item.image_path or f"{s.questions} (inline image)")


MAX_BAD_ROWS = 20  # image rows that cannot be asked (prepare rejects them too) before the demo gives up


def instruct_question(ds: DatasetSettings, allow_paths_outside_image_folder: bool = False) -> DemoQuestion:
    """The first human turn of the first good row with an image, its `<image>` tags removed. Rows are streamed from
    the start of each source, so a 1 GB annotation file is read only up to that row."""
    problems = []
    for where, (raw, inline, defect), image_folder in dataset_rows(ds):
        try:
            if defect:
                raise formats.RowError("malformed_row", defect)
            question = row_question(raw, inline, image_folder, allow_paths_outside_image_folder, ds.kind)
        except ValueError as error:  # RowError included
            problems.append(f"{where}: {error}")
            if len(problems) >= MAX_BAD_ROWS:  # a wrong image_folder: every row fails; do not read them all
                break
            continue
        if question is not None:
            return dataclasses.replace(question, origin=f"{where} ({question.origin})")
    raise ValueError(f"no row to ask the endpoint about in {[s.path for s in dataset_sources(ds)]}"
                     + (f"; the first problem: {problems[0]}" if problems else ": no row has an image")
                     + "; or give the workflow an eval set (evaluate.questions or evaluate.sets)")


def dataset_rows(ds: DatasetSettings):
    """(where, `SourceRow`, image folder) of every row of every source, in file order, streamed."""
    for source in dataset_sources(ds):
        for index, row in enumerate(iter_rows(source.path)):
            yield f"{source.path} row {index}", row, source.image_folder


def row_question(raw: str, inline: list, image_folder: str, allow_outside: bool = False,
                 kind: str = "conversations") -> DemoQuestion | None:
    """The row's question (a conversation's first human turn, a preference pair's prompt) and images; None for a
    text-only row. A row prepare would reject raises ValueError."""
    row = json.loads(raw)
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    names = formats.image_list(row)
    if not names:
        return None
    turns = (read_preference_row(row).prompt if kind == "preference"
             else formats.normalise_conversation(row, len(names)))
    images = [inline[i] if i < len(inline) and inline[i] is not None
              else read_image_bytes(image_folder, name, allow_outside) for i, name in enumerate(names)]
    for image in images:
        image_mime(image)  # an image the server cannot read would fail the demo: take the next row
    return DemoQuestion(turns[0].text.replace(formats.IMAGE_TAG, "").strip(), images, ", ".join(map(str, names)))


def curl_example(url: str, model_name: str, key_reference: str | None) -> str:
    """A curl command for the endpoint; the key appears as the shell reference to where it lives, never itself."""
    auth = f' -H "Authorization: Bearer {key_reference}"' if key_reference else ""
    return (
        f'IMG=$(base64 -w0 path/to/image.png)\n'
        f'curl -s {url}/v1/chat/completions -H "Content-Type: application/json"{auth} -d \'{{"model": "{model_name}", '
        f'"messages": [{{"role": "user", "content": [{{"type": "text", "text": "What colour is the shape?"}}, '
        f'{{"type": "image_url", "image_url": {{"url": "data:image/png;base64,\'"$IMG"\'"}}}}]}}], "max_tokens": 16}}\''
    )


def serve_and_demo(ctx) -> dict:
    """The stage: deploy, ask, print the endpoint and a curl example, and record the exchange in `serve/demo.json`."""
    from llava_core.serve.app import replica_api_key

    w = ctx.workflow
    model_name = w.serve.model_name or w.name
    question = demo_question(w)  # before deploying: a workflow with nothing to ask fails without waiting for a model
    # The export's URI, not a copy on this (the driver's) disk: the replica may run on another node and mirrors it.
    url = deploy(storage.absolute(ctx.stage_dir("export")), w.serve, model_name)
    api_key = replica_api_key(w.serve)  # the demo asks with the key the replicas read, from the same place
    started = time.time()
    request = chat_request(model_name, question.text, question.images)
    response = post_chat(url, request, api_key)
    if response.status_code != 200:  # the endpoint's own message says why (a prompt over the context, a bad image)
        raise RuntimeError(f"the demo request about {question.origin} got {response.status_code}: "
                           f"{response.text[:1000]}")
    body = response.json()
    answer = body["choices"][0]["message"]["content"]
    print(f"\nendpoint  {url}/v1/chat/completions  (model '{model_name}', OpenAI-compatible)\n{auth_line(w.serve)}")
    print(f"asked     {question.text!r} about {question.origin}")
    print(f"answered  {answer!r} in {time.time() - started:.2f}s")
    key_reference = shell_reference(w.serve.api_key_env, w.serve.api_key_file)
    print(f"try it:\n{curl_example(url, model_name, key_reference)}\n", flush=True)
    result = {"url": url, "model": model_name, "question": question.text, "image": question.origin, "answer": answer,
              "max_tokens": request["max_tokens"], "usage": body["usage"]}
    storage.write_json(storage.join(ctx.stage_dir("serve"), "demo.json"), result)
    return result

