"""An OpenAI-compatible chat endpoint for the exported model on Ray Serve, with dynamic batching and streaming.

Each request is checked completely in the ingress (its body by `protocol`, its images and videos by `media`, its
length against the model's context with the engine's token counts), then waits a few milliseconds in `@serve.batch`
so that concurrent requests share one `generate` call. The batch function is an async generator: after every decoding
step it hands each request its new text, which a streaming request sends as a server-sent event (`sse`) and a plain
request collects, so both kinds share batches and get the same answer. Every refusal is a 4xx in OpenAI's error
shape; only a fault of the server itself is a 500.

This module is the replica (the deployment and its routes) and the application builder; the driver deploys it, waits
for it and asks it with `serve.client`.
"""
# No `from __future__ import annotations` here: FastAPI must see `Request` as a class, not as a string, once Serve has
# rebound the route methods to the replica.
import asyncio
import concurrent.futures
import hmac
import logging
import re
import threading
import time
import uuid
from typing import AsyncIterator, Optional

import ray
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_core import storage
from llava_core.config import ServeSettings, serve_settings_from_dict
from llava_core.inference.answer_stream import StreamEvent, completion_from_events
from llava_core.inference.engine import GenerationEngine, GenerationRequest
from llava_core.secrets import read_secret
from llava_core.serve import json_body, protocol, responses
from llava_core.serve.deploy_config import DEPLOYMENT_NAME, default_model_name, replica_options
from llava_core.serve.errors import ApiError, body_timeout, error_body, payload_too_large, unauthorized, unavailable
from llava_core.serve.media import decode_media
from llava_core.serve.sse import ChunkWriter, data_line

log = logging.getLogger(__name__)

# Each response says how many requests shared its `generate` call: the observable proof that batching happens.
BATCH_SIZE_HEADER = "x-llava-batch-size"

# FastAPI's own /docs, /redoc and /openapi.json would answer without the API key: they are routes of the replica
# below instead, behind the same check as the API they describe.
api = FastAPI(title="llava-ray", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def api_error_response(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@api.exception_handler(StarletteHTTPException)
async def http_error_response(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # Unknown paths and wrong methods still answer in OpenAI's shape, which clients know how to report.
    return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)


@api.exception_handler(Exception)
async def server_error_response(request: Request, error: Exception) -> JSONResponse:
    # A 500 is a bug of the server: logged here, once, under the id the client is given to report it by.
    return JSONResponse(server_error_body(error, request_id(request)), status_code=500)


def server_error_body(error: BaseException, request_id: str) -> dict:
    log.error("request %s failed", request_id, exc_info=error)
    return error_body(f"internal server error ({type(error).__name__}); request id {request_id}", "server_error",
                      code="internal_error")


def request_id(request: Request) -> str:
    """Serve's id for this request (its proxy sets the `x-request-id` header, and returns it in the response)."""
    given = request.headers.get("x-request-id", "")
    return given[:64] if REQUEST_ID.fullmatch(given[:64]) else uuid.uuid4().hex


REQUEST_ID = re.compile(r"[\w.:-]+")  # a client may send its own id: keep log lines and messages plain


async def read_json(request: Request, max_bytes: int, timeout_s: float):
    """The parsed body, refused with 413 as soon as it is known to be over `max_bytes` (from Content-Length, or while
    reading a body that does not declare its length), before anything is parsed, and with 408 when it has not
    arrived within `timeout_s`: a client sending a byte a second must not hold a request slot forever."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise payload_too_large(int(declared), max_bytes)
    try:
        data = await asyncio.wait_for(read_body(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise body_timeout(timeout_s) from None
    # Parsing a large body is CPU work: off the event loop.
    return await asyncio.to_thread(json_body.parse_json_body, data)


async def read_body(request: Request, max_bytes: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise payload_too_large(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def load_in_background(model_dir: str) -> concurrent.futures.Future:
    """Load the model in a thread, so the replica answers `/health` (and says it is not ready) while it loads."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def load() -> None:
        try:
            # transformers loads local files; a model in S3 is mirrored to this node's disk once.
            local = storage.local_copy(model_dir)
            future.set_result(GenerationEngine(local))
        except BaseException as error:  # noqa: BLE001 - reported by /ready and check_health
            log.exception("loading the model from %s failed", model_dir)
            future.set_exception(error)

    threading.Thread(target=load, name="load-model", daemon=True).start()
    return future


def replica_api_key(settings: ServeSettings) -> Optional[str]:
    """The key from this replica's own environment or file. Named but missing, it raises: the replica fails to
    start rather than serve unauthenticated (deploy reports the replica's error)."""
    return read_secret(settings.api_key_env, settings.api_key_file, "serve.api_key_env/api_key_file")


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class LlavaServer:
    def __init__(self, model_dir: str, settings: ServeSettings, model_name: str):
        self.settings = settings
        self.api_key = replica_api_key(settings)
        self.model_name = model_name
        self.created = int(time.time())
        self.loading = load_in_background(model_dir)
        # `@serve.batch` takes its limits at class definition; the workflow's settings replace them per deployment.
        self.generate_batch.set_max_batch_size(settings.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    def check_health(self) -> None:
        # Serve calls this periodically; a replica whose model failed to load is replaced by a new one.
        if self.loading.done() and self.loading.exception() is not None:
            raise RuntimeError(f"the model failed to load: {self.loading.exception()!r}")

    async def engine(self) -> GenerationEngine:
        """The loaded engine; requests that arrive while it loads wait for it."""
        try:
            return await asyncio.wrap_future(self.loading)
        except Exception as error:  # noqa: BLE001 - the replica will be replaced; the client may retry
            raise unavailable(f"the model failed to load ({type(error).__name__}); retry shortly") from None

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self) -> JSONResponse:
        """200 once the model is loaded and answering; 503 while it loads (or if loading failed)."""
        if self.loading.done() and self.loading.exception() is None:
            return JSONResponse({"status": "ready", "model": self.model_name})
        reason = "the model is loading" if not self.loading.done() else "the model failed to load"
        return JSONResponse(error_body(reason, "server_error", code="not_ready"), status_code=503)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self.authorize(request)
        return responses.ModelList(data=[self.model_card()]).model_dump()

    @api.get("/v1/models/{model}")
    async def get_model(self, model: str, request: Request) -> dict:
        self.authorize(request)
        protocol.check_model(model, self.model_name)
        return self.model_card().model_dump()

    def model_card(self) -> responses.ModelCard:
        return responses.ModelCard(id=self.model_name, created=self.created)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self.authorize(request)
        body = await read_json(request, self.settings.max_body_bytes, self.settings.body_read_timeout_s)
        engine = await self.engine()
        # Image decoding and tokenizing are CPU work; a thread keeps the event loop free to accept other requests.
        chat, generation_request = await asyncio.to_thread(self.validate, engine, body)
        events = self.answer_events(generation_request)
        try:
            # Wait for the first step before answering, so a failure before any text is an ordinary error response.
            first, batch_size = await anext(events)
        except BaseException:
            generation_request.cancelled.set()
            raise
        headers = {BATCH_SIZE_HEADER: str(batch_size)}
        if chat.stream:
            return StreamingResponse(self.stream(chat, generation_request, first, events, request_id(request)),
                                     media_type="text/event-stream", headers=headers)
        try:
            collected = [first] + [event async for event, _ in events]
        finally:
            generation_request.cancelled.set()
        answer = completion_from_events(collected)
        body = responses.ChatCompletion.answer(self.model_name, answer.text, answer.finish_reason, answer.prompt_tokens,
                                              answer.completion_tokens)
        return JSONResponse(body.model_dump(), headers=headers)

    async def stream(self, chat: protocol.ChatCompletionRequest, generation_request: GenerationRequest,
                     first: StreamEvent, events: AsyncIterator, rid: str) -> AsyncIterator[str]:
        writer = ChunkWriter(self.model_name, chat.include_usage)
        try:
            yield writer.start() + writer.event(first)
            async for event, _ in events:
                yield writer.event(event)
        except Exception as error:  # noqa: BLE001 - the status line is sent already; say it in the stream
            yield data_line(server_error_body(error, rid))
        finally:
            # A client that went away cancels this generator; its row in the batch stops at the next step.
            generation_request.cancelled.set()

    async def answer_events(self, generation_request: GenerationRequest) -> AsyncIterator[tuple[StreamEvent, int]]:
        """This request's events from its batch, up to and including the one with its finish_reason."""
        async for item in self.generate_batch(generation_request):
            if item is None:
                continue
            if item[0].error is not None:  # this request's generation failed; its batch went on without it
                raise item[0].error
            yield item
            if item[0].finish_reason is not None:
                return

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_schema(self, request: Request) -> JSONResponse:
        self.authorize(request)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        self.authorize(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="llava-ray")

    def authorize(self, request: Request) -> None:
        expected = self.api_key
        if not expected:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise unauthorized("missing API key: send the header `Authorization: Bearer <key>`")
        if not hmac.compare_digest(key.strip().encode(), expected.encode()):
            raise unauthorized("incorrect API key")

    def validate(self, engine: GenerationEngine, body) -> tuple[protocol.ChatCompletionRequest, GenerationRequest]:
        """The checked request and the engine's input for it: the body's shape first, then its images and videos,
        then its length in tokens against the model's context."""
        chat = protocol.parse_chat_request(body, self.settings, self.model_name, engine.takes_videos)
        images, videos = decode_media(chat, self.settings)
        messages = chat.template_messages()
        media_tokens = engine.count_image_tokens(images, videos)
        protocol.check_image_tokens(media_tokens, self.settings.max_image_tokens)
        prompt_tokens = engine.count_prompt_tokens(messages, images, videos, media_tokens)
        max_tokens = protocol.answer_length(chat, prompt_tokens, engine.context_length,
                                            self.settings.default_max_tokens)
        return chat, GenerationRequest(messages, images, chat.decoding(max_tokens), videos=videos)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batch(self, requests: list[GenerationRequest]) -> AsyncIterator[list]:
        """Run one batch; after each decoding step yield, per request, `(event, batch size)`, None (nothing new)
        or, once its answer is complete, the sentinel that ends its stream."""
        engine = await self.engine()
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()

        def on_step(events: list[Optional[StreamEvent]]) -> None:  # called in the generation thread
            loop.call_soon_threadsafe(steps.put_nowait, events)

        # Generation blocks for the whole batch; in a thread, the replica keeps taking requests for the next one.
        job = asyncio.ensure_future(asyncio.to_thread(engine.run_batch, requests, on_step))
        job.add_done_callback(lambda _: steps.put_nowait(None))
        finished = [False] * len(requests)
        while (events := await steps.get()) is not None:
            results = []
            for row, event in enumerate(events):
                if finished[row]:
                    results.append(StopAsyncIteration)
                    continue
                results.append(None if event is None else (event, len(requests)))
                finished[row] = event is not None and event.finish_reason is not None
            yield results
        await job  # raises what generation raised, which fails every request of the batch


def gpus_per_replica(settings: ServeSettings) -> float:
    # Not set in the workflow: a replica takes one GPU when the cluster has any, else none.
    if settings.gpus_per_replica is not None:
        return settings.gpus_per_replica
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def application(model_dir: str, settings: ServeSettings, model_name: str):
    options = replica_options(settings, gpus_per_replica(settings))
    env = storage.s3_env()
    if env:  # the replica mirrors an s3:// export itself, on a node that may not have the driver's S3 settings
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    return LlavaServer.options(**options).bind(model_dir, settings, model_name)


def build_app(args: dict):
    """The application builder a Ray Serve config names (`import_path: llava_core.serve.app:build_app`), as
    `llava-ray serve --config-out` writes it: `args` holds `model_dir`, `model_name` and the `settings` mapping."""
    settings = serve_settings_from_dict(args.get("settings") or {}, "args.settings")
    model_dir = args["model_dir"]
    return application(model_dir, settings, args.get("model_name") or settings.model_name
                       or default_model_name(model_dir))

