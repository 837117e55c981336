"""The driver's side of an endpoint: deploy the application on Ray Serve and wait until it answers, ask it a chat
request, keep it serving, take it down.

Nothing here loads a model: the replicas do (`serve.app`), on whichever nodes Serve places them.
"""
from __future__ import annotations

import base64
import io
import os
import time

import requests
from PIL import Image, UnidentifiedImageError

from llava_core.config import ServeSettings
from llava_core.secrets import ENDPOINT_KEY_VARIABLE, shell_reference
from llava_core.serve.deploy_config import APP_NAME
from llava_core.serve.readiness import ready_timeout_s, wait_until_ready


def deploy(model_dir: str, settings: ServeSettings, model_name: str) -> str:
    """Serve `model_dir` (a storage URI every node can read: each replica mirrors it itself) on the already-initialised
    Ray with `settings.engine`; returns the base URL once the model answers, or fails saying what the replicas are
    doing. The workflow's serve stage and `llava-ray serve` both deploy through here, the application the one
    `--config-out` writes."""
    from ray import serve

    timeout_s = ready_timeout_s(settings, model_dir)
    # Not waiting inside Serve: its wait has no limit (a replica that no node can place waits forever) and says nothing.
    if settings.engine == "vllm":
        deploy_vllm(model_dir, settings, model_name)
    else:
        from llava_core.serve.app import application

        serve.start(http_options={"host": settings.host, "port": settings.port})
        target = serve.RunTarget(application(model_dir, settings, model_name), name=APP_NAME, route_prefix="/")
        serve.run_many([target], wait_for_applications_running=False)
    url = f"http://{client_host(settings.host)}:{settings.port}"
    wait_until_ready(url, APP_NAME, timeout_s, READY_PATHS[settings.engine])
    return url


# What answers 200 once the model is loaded: our app's own readiness route; Ray's LLM app lists its model.
READY_PATHS = {"transformers": "/ready", "vllm": "/v1/models"}


def deploy_vllm(model_dir: str, settings: ServeSettings, model_name: str) -> None:
    """Deploy Ray's vLLM app as a Serve config, by import path, as `serve deploy` does with `--config-out`'s file:
    the driver imports nothing of vLLM (which may not be installed beside it), Serve's controller builds the app in
    its runtime environment (`serve.vllm.python`). Serve's config API is `ray.serve._private.api`'s client (what
    `serve run CONFIG` uses): Ray is pinned below 2.61, and tests/end_to_end/test_serve_vllm.py runs this path."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from llava_core import storage
    from llava_core.serve.deploy_config import export_family, vllm_application

    app = vllm_application(model_dir, settings, model_name, export_family(model_dir), env=storage.s3_env())
    client = serve_start(http_options={"host": settings.host, "port": settings.port})
    client.deploy_apps(ServeDeploySchema(applications=[app]), _blocking=False)


def shutdown() -> None:
    """Stop the application and Serve's proxies, so a later `deploy` can listen on another host or port."""
    from ray import serve

    serve.shutdown()


def serve_until_interrupted() -> None:
    print("serving until Ctrl-C ...", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down the endpoint", flush=True)
    finally:
        shutdown()


def auth_line(settings: ServeSettings) -> str:
    """How the endpoint checks its callers, printed beside its URL. The key has one place: the serve settings'
    `api_key_env` / `api_key_file` (a workflow's `serve:` section, or `llava-ray serve --api-key-env/-file`)."""
    reference = shell_reference(settings.api_key_env, settings.api_key_file)
    if reference:
        return f"auth      every request needs `Authorization: Bearer {reference}`"
    line = ("auth      none: anyone who reaches the endpoint may call it (to require a key, name where it is: "
            "serve.api_key_env or serve.api_key_file)")
    if os.environ.get(ENDPOINT_KEY_VARIABLE):
        line += (f"\nwarning: {ENDPOINT_KEY_VARIABLE} is set here, but the endpoint reads a key only from where "
                 f"serve.api_key_env names it (llava-ray serve --api-key-env {ENDPOINT_KEY_VARIABLE})")
    return line


def client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def image_mime(image_bytes: bytes) -> str:
    """The media type of encoded image bytes (image/png, image/jpeg, ...), read from their header."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            return Image.MIME[image.format]
    except (UnidentifiedImageError, KeyError) as error:
        raise ValueError(f"not an image in a format PIL knows ({error})") from None


def image_data_url(image_bytes: bytes) -> str:
    return f"data:{image_mime(image_bytes)};base64," + base64.b64encode(image_bytes).decode()


def chat_request(model_name: str, question: str, images: list[bytes], max_tokens: int = 16) -> dict:
    return {
        "model": model_name,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": question},
            *({"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images),
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def post_chat(url: str, body: dict, api_key: str | None, timeout_s: float = 120) -> requests.Response:
    """POST `body` to the endpoint at `url`, with the key when the endpoint has one."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return requests.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout_s)
