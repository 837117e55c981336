"""Two ways to answer the same questions greedily: the serving engine in Ray Data actors, or a live endpoint.

Both take the same `Query`s (the question and the image's encoded bytes or path) and answer through one generation
path: the in-process actors hold the endpoint's own `GenerationEngine` (chat template, the family's image steps,
batching, greedy decoding, stop handling) and the endpoint runs that engine behind its protocol, sent the body its
own client helper builds (`serve.client.chat_request`). Images travel as their original bytes (the endpoint decodes
them with the same `decode_image`), so both backends see the same pixels and give the same answers on the same model.
"""
from __future__ import annotations

import base64
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import requests
from PIL import Image

from llava_core import storage
from llava_core.config import EvalEndpointSettings
from llava_core.data import images
from llava_core.progress import RowProgress
from llava_core.secrets import read_secret
from llava_core.serve.client import chat_request

log = logging.getLogger(__name__)


@dataclass
class Query:
    key: str  # unique across the whole evaluation
    text: str
    max_new_tokens: int  # the longest answer: its set's (`EvaluateSettings.answer_tokens`), so each query carries it
    image_path: str = ""  # read from here ...
    image_b64: str = ""  # ... or inline (MMBench's TSV images)
    blank: str = ""  # the blind baseline: "r,g,b", the image replaced by one of its own size in that colour


def source_bytes(query: Query | dict) -> bytes:
    """The question's own image, encoded, as read."""
    query = query if isinstance(query, dict) else asdict(query)
    return base64.b64decode(query["image_b64"]) if query["image_b64"] else storage.read_bytes(query["image_path"])


def image_bytes(query: Query | dict) -> bytes:
    """What the question is asked with, encoded: its image, or for the blind baseline a PNG of `blank_image`."""
    query = query if isinstance(query, dict) else asdict(query)
    if not query.get("blank"):
        return source_bytes(query)
    buffer = io.BytesIO()
    blank_image(source_bytes(query), query["blank"]).save(buffer, format="PNG")
    return buffer.getvalue()


def blank_image(data: bytes, rgb: str) -> Image.Image:
    """One colour at the encoded image's own size (read from its header: no pixel is decoded). The blind baseline
    keeps the image's layout (LLaVA-NeXT and OneVision tile an image by its size, so its token count) and loses only
    its content: a fixed-size blank gave a OneVision model a grid it never trained on, and it answered "redthree"
    instead of guessing."""
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
    return Image.new("RGB", size, tuple(int(c) for c in rgb.split(",")))


def query_picture(query: dict) -> Image.Image:
    """The decoded image a question is asked with; a blind question's blank is made directly, never encoded."""
    data = source_bytes(query)
    return blank_image(data, query["blank"]) if query.get("blank") else images.decode_image(data)


# --- in-process: Ray Data actors ----------------------------------------------------------------------------------


def question_request(question: str, picture, max_new_tokens: int):
    """An eval question as the engine takes a chat request: one user turn with the image and the question, greedy."""
    from llava_core.inference.decoding import DecodingParams
    from llava_core.inference.engine import GenerationRequest

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return GenerationRequest(messages, [picture], DecodingParams(max_tokens=max_new_tokens, temperature=0))


def answer_questions(engine, questions: list[str], pictures: list, max_new_tokens: list[int],
                     batch_size: int) -> list[str]:
    """Greedy answers from the serving engine, `batch_size` questions to a `generate` call, each answer stripped and
    at most its own `max_new_tokens` long (the engine ends each row of a batch on its own)."""
    answers = []
    for start in range(0, len(questions), batch_size):
        chunk = slice(start, start + batch_size)
        batch = [question_request(q, p, n)
                 for q, p, n in zip(questions[chunk], pictures[chunk], max_new_tokens[chunk])]
        answers += [completion.text.strip() for completion in engine.generate(batch)]
    return answers


class ExportAnswerer:
    """A Ray Data actor holding one serving engine (one copy of the exported model)."""

    def __init__(self, export_dir: str, batch_size: int):
        from llava_core.inference.engine import GenerationEngine

        # The engine loads through load_llava, which mirrors an s3:// export to the actor's own node (on a cluster
        # the driver's disk is not its disk); bf16 on a GPU, fp32 on CPU.
        self.engine = GenerationEngine(export_dir)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        rows = [{"image_b64": b, "image_path": p, "blank": k}
                for b, p, k in zip(batch["image_b64"], batch["image_path"], batch["blank"])]
        pictures = [query_picture(row) for row in rows]
        answers = answer_questions(self.engine, list(batch["text"]), pictures,
                                   [int(n) for n in batch["max_new_tokens"]], self.batch_size)
        return {"key": batch["key"], "prediction": np.array(answers, dtype=object)}


def actor_pool_size(wanted: int) -> tuple[int, dict]:
    """As many actors as asked for and the cluster can hold now, at least one; one GPU each where there are GPUs."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return max(1, min(wanted, gpus)), {"num_gpus": 1}
    free_cpus = int(ray.available_resources().get("CPU", 0))
    return max(1, min(wanted, free_cpus)), {"num_cpus": 1}


def answer_in_process(queries: list[Query], export_dir: str, batch_size: int, num_actors: int) -> dict[str, str]:
    import ray

    size, resources = actor_pool_size(num_actors)
    log.info("evaluating %d prompts with %d Ray Data actor(s)", len(queries), size)
    answered = (
        ray.data.from_items([asdict(q) for q in queries],
                            override_num_blocks=max(1, min(len(queries) // batch_size + 1, 4 * size)))
        .map_batches(ExportAnswerer, fn_constructor_args=(export_dir, batch_size),
                     batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=size), **resources)
        .iter_rows()
    )
    return collect_answers(((row["key"], row["prediction"]) for row in answered), len(queries))


def collect_answers(answered, total: int) -> dict[str, str]:
    """`{key: answer}` from `(key, answer)` pairs as they arrive, with a progress line every half minute: the driver
    only counts (the answers are a few words each)."""
    progress, answers = RowProgress("evaluate", "prompt", total, time.time()), {}
    for key, answer in answered:
        answers[key] = answer
        line = progress.report(len(answers), time.time())
        if line:
            log.info(line)
    return answers


# --- a live endpoint (OpenAI protocol) --------------------------------------------------------------------------


def completions_url(base: str) -> str:
    base = base.rstrip("/")
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


def ask_endpoint(session: requests.Session, query: Query, endpoint: EvalEndpointSettings) -> str:
    body = chat_request(endpoint.model, query.text, [image_bytes(query)], query.max_new_tokens)
    response = session.post(completions_url(endpoint.url), json=body, timeout=endpoint.timeout_s)
    if response.status_code != 200:
        raise RuntimeError(f"{endpoint.url} answered {response.status_code} to question {query.key!r}: "
                           f"{response.text[:500]}")
    return response.json()["choices"][0]["message"]["content"].strip()


def answer_by_endpoint(queries: list[Query], endpoint: EvalEndpointSettings) -> dict[str, str]:
    log.info("evaluating %d prompts through %s (%d in flight)", len(queries), endpoint.url, endpoint.concurrency)
    api_key = read_secret(endpoint.api_key_env, endpoint.api_key_file, "evaluate.endpoint.api_key_env/api_key_file")
    with requests.Session() as session, ThreadPoolExecutor(endpoint.concurrency) as pool:
        if api_key:
            session.headers["Authorization"] = f"Bearer {api_key}"
        answers = pool.map(lambda q: ask_endpoint(session, q, endpoint), queries)
        return collect_answers(((q.key, a) for q, a in zip(queries, answers)), len(queries))
