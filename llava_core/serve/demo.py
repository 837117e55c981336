"""The serve stage of a workflow: deploy the export, prove it answers with one real request, then keep serving."""
from __future__ import annotations

import base64
import time

import requests

from llava_core import storage
from llava_core.eval.evaluate import read_jsonl


def image_data_url(image_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image_bytes).decode()


def chat_request(model_name: str, question: str, image_bytes: bytes, max_tokens: int = 16) -> dict:
    return {
        "model": model_name,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": image_data_url(image_bytes)}},
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def curl_example(url: str, model_name: str, api_key: str | None) -> str:
    auth = f' -H "Authorization: Bearer {api_key}"' if api_key else ""
    return (
        f'IMG=$(base64 -w0 path/to/image.png)\n'
        f'curl -s {url}/v1/chat/completions -H "Content-Type: application/json"{auth} -d \'{{"model": "{model_name}", '
        f'"messages": [{{"role": "user", "content": [{{"type": "text", "text": "What colour is the shape?"}}, '
        f'{{"type": "image_url", "image_url": {{"url": "data:image/png;base64,\'"$IMG"\'"}}}}]}}], "max_tokens": 16}}\''
    )


def serve_and_demo(ctx) -> dict:
    from llava_core.serve.app import deploy

    w = ctx.workflow
    model_name = w.serve.model_name or w.name
    url = deploy(storage.local_copy(ctx.stage_dir("export"), ctx.cache_dir), w.serve, model_name)
    question = read_jsonl(w.evaluate.questions)[0]
    image_bytes = storage.read_bytes(storage.join(w.evaluate.image_folder, question["image"]))
    headers = {"Authorization": f"Bearer {w.serve.api_key}"} if w.serve.api_key else {}
    started = time.time()
    response = requests.post(f"{url}/v1/chat/completions", json=chat_request(model_name, question["text"], image_bytes),
                             headers=headers, timeout=120)
    response.raise_for_status()
    answer = response.json()["choices"][0]["message"]["content"]
    print(f"\nendpoint  {url}/v1/chat/completions  (model '{model_name}', OpenAI-compatible)")
    print(f"asked     {question['text']!r} about {question['image']}")
    print(f"answered  {answer!r} in {time.time() - started:.2f}s")
    print(f"try it:\n{curl_example(url, model_name, w.serve.api_key)}\n", flush=True)
    result = {"url": url, "model": model_name, "question": question["text"], "answer": answer}
    storage.write_json(storage.join(ctx.stage_dir("serve"), "demo.json"), result)
    return result


def serve_until_interrupted() -> None:
    from llava_core.serve.app import shutdown

    print("serving until Ctrl-C ...", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down the endpoint", flush=True)
    finally:
        shutdown()
