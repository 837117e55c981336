"""An OpenAI-compatible chat endpoint for the exported model on Ray Serve, with dynamic batching.

Each request is checked completely in the ingress (`protocol`), then waits a few milliseconds in `@serve.batch` so
that concurrent requests share one `generate` call. Every refusal is a 4xx in OpenAI's error shape; only a fault of
the server itself is a 500.
"""
# No `from __future__ import annotations` here: FastAPI must see `Request` as a class, not as a string, once Serve has
# rebound the route methods to the replica.
import asyncio
import hmac
import json
import logging
import time
import urllib.error
import urllib.request

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_core.config import ServeSettings
from llava_core.serve import protocol
from llava_core.serve.engine import Completion, GenerationEngine, GenerationRequest
from llava_core.serve.errors import ApiError, bad_request, error_body, unauthorized

log = logging.getLogger(__name__)

APP_NAME = "llava"
# Each response says how many requests shared its `generate` call: the observable proof that batching happens.
BATCH_SIZE_HEADER = "x-llava-batch-size"

api = FastAPI(title="llava-ray")


@api.exception_handler(ApiError)
async def api_error_response(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(StarletteHTTPException)
async def http_error_response(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # Unknown paths and wrong methods still answer in OpenAI's shape, which clients know how to report.
    return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)


@api.exception_handler(Exception)
async def server_error_response(request: Request, error: Exception) -> JSONResponse:
    log.exception("request failed")
    return JSONResponse(error_body(f"internal server error: {type(error).__name__}", "server_error"), status_code=500)


async def read_json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}") from None


@serve.deployment
@serve.ingress(api)
class LlavaServer:
    def __init__(self, model_dir: str, settings: ServeSettings, model_name: str):
        self.engine = GenerationEngine(model_dir)
        self.settings = settings
        self.model_name = model_name
        self.created = int(time.time())
        # `@serve.batch` takes its limits at class definition; the workflow's settings replace them per deployment.
        self.generate_batch.set_max_batch_size(settings.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self.authorize(request)
        return protocol.models_body(self.model_name, self.created)

    @api.get("/v1/models/{model}")
    async def get_model(self, model: str, request: Request) -> dict:
        self.authorize(request)
        protocol.check_model(model, self.model_name)
        return protocol.model_card(self.model_name, self.created)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        self.authorize(request)
        body = await read_json(request)
        # Image decoding and tokenizing are CPU work; a thread keeps the event loop free to accept other requests.
        generation_request = await asyncio.to_thread(self.validate, body)
        completion, batch_size = await self.generate_batch(generation_request)
        return JSONResponse(protocol.chat_completion_body(completion, self.model_name),
                            headers={BATCH_SIZE_HEADER: str(batch_size)})

    def authorize(self, request: Request) -> None:
        expected = self.settings.api_key
        if not expected:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise unauthorized("missing API key: send the header `Authorization: Bearer <key>`")
        if not hmac.compare_digest(key.strip().encode(), expected.encode()):
            raise unauthorized("incorrect API key")

    def validate(self, body) -> GenerationRequest:
        chat = protocol.parse_chat_request(body, self.settings, self.model_name)
        prompt_tokens = self.engine.count_prompt_tokens(chat.messages, len(chat.images))
        return protocol.fit_to_context(chat, prompt_tokens, self.engine.context_length,
                                       self.settings.default_max_tokens)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batch(self, requests: list[GenerationRequest]) -> list[tuple[Completion, int]]:
        # Generation blocks for the whole batch; in a thread, the replica keeps taking requests for the next one.
        completions = await asyncio.to_thread(self.engine.generate, requests)
        return [(completion, len(requests)) for completion in completions]


def deploy(model_dir: str, settings: ServeSettings, model_name: str) -> str:
    """Serve `model_dir` on the already-initialised Ray; returns the base URL once `/health` answers."""
    serve.start(http_options={"host": settings.host, "port": settings.port})
    deployment = LlavaServer.options(num_replicas=settings.num_replicas,
                                     max_ongoing_requests=settings.max_ongoing_requests,
                                     ray_actor_options=replica_resources())
    serve.run(deployment.bind(model_dir, settings, model_name), name=APP_NAME, route_prefix="/")
    url = f"http://{client_host(settings.host)}:{settings.port}"
    wait_until_healthy(url)
    return url


def replica_resources() -> dict:
    # ServeSettings has no resource fields: a replica takes one GPU when the cluster has any, else one CPU.
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    return {"num_cpus": 1, "num_gpus": 1} if has_gpu else {"num_cpus": 1}


def shutdown() -> None:
    """Stop the application and Serve's proxies, so a later `deploy` can listen on another host or port."""
    serve.shutdown()


def client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def wait_until_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/health did not answer within {timeout_s:.0f}s; if Serve was already running "
                               "with other HTTP options, call shutdown() first")
        time.sleep(0.2)
