"""Two ways to answer the same questions greedily: the exported model in Ray Data actors, or a live endpoint.

Both take the same `Query`s (the exact prompt text and the image's encoded bytes or path) and both end in the same
steps: the chat template with the image first, pad-to-square with the processor's mean colour, `LlavaProcessor`,
greedy decoding, the answer stripped. Images travel as their original bytes (the endpoint decodes them with the
same `decode_image`), so both backends see the same pixels and give the same answers on the same model.
"""
from __future__ import annotations

import base64
import io
import logging
import mimetypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import requests
import torch
from PIL import Image

from llava_core import storage
from llava_core.config import EvalEndpointSettings
from llava_core.data import images
from llava_core.secrets import read_secret

log = logging.getLogger(__name__)


@dataclass
class Query:
    key: str  # unique across the whole evaluation
    text: str
    image_path: str = ""  # read from here ...
    image_b64: str = ""  # ... or inline (MMBench's TSV images)
    blank: str = ""  # the blind baseline: "r,g,b", the image replaced by one of its own size in that colour


def image_bytes(query: Query | dict) -> bytes:
    query = query if isinstance(query, dict) else asdict(query)
    data = base64.b64decode(query["image_b64"]) if query["image_b64"] else storage.read_bytes(query["image_path"])
    return blank_like(data, query["blank"]) if query.get("blank") else data


def blank_like(data: bytes, rgb: str) -> bytes:
    """A PNG of the encoded image's own size in one colour. The blind baseline keeps the image's layout (LLaVA-NeXT
    and OneVision tile an image by its size, so its token count) and loses only its content: a fixed-size blank
    gave a OneVision model a grid it never trained on, and it answered "redthree" instead of guessing."""
    size = images.decode_image(data).size
    buffer = io.BytesIO()
    Image.new("RGB", size, tuple(int(c) for c in rgb.split(","))).save(buffer, format="PNG")
    return buffer.getvalue()


# --- in-process: Ray Data actors ----------------------------------------------------------------------------------


def prompt_for(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.inference_mode()
def generate_answers(model, processor, questions: list[str], pil_images: list, max_new_tokens: int,
                     batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding; images go to the processor as in training (`processor_images`)."""
    from llava_core.data.image_layouts import processor_images

    processor.tokenizer.padding_side = "left"
    fill = images.mean_colour(processor.image_processor)
    answers = []
    for start in range(0, len(questions), batch_size):
        chunk = slice(start, start + batch_size)
        prompts = [prompt_for(processor, q) for q in questions[chunk]]
        pictures = processor_images(model.config.model_type, [[im] for im in pil_images[chunk]], fill)
        inputs = processor(images=pictures, text=prompts, padding=True, return_tensors="pt").to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=processor.tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers += [t.strip() for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


class ExportAnswerer:
    """A Ray Data actor holding one copy of the exported model."""

    def __init__(self, export_dir: str, max_new_tokens: int, batch_size: int):
        from llava_core.model.build import load_llava

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        # load_llava mirrors an s3:// export to the actor's own node: on a cluster the driver's disk is not its disk.
        model, self.processor = load_llava(export_dir, dtype=dtype)
        self.model = model.to(device).eval()
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, batch: dict) -> dict:
        rows = [{"image_b64": b, "image_path": p, "blank": k}
                for b, p, k in zip(batch["image_b64"], batch["image_path"], batch["blank"])]
        pictures = [images.decode_image(image_bytes(row)) for row in rows]
        answers = generate_answers(self.model, self.processor, list(batch["text"]), pictures,
                                   self.max_new_tokens, self.batch_size)
        return {"key": batch["key"], "prediction": np.array(answers, dtype=object)}


def actor_pool_size(wanted: int) -> tuple[int, dict]:
    """As many actors as asked for and the cluster can hold now, at least one; one GPU each where there are GPUs."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return max(1, min(wanted, gpus)), {"num_gpus": 1}
    free_cpus = int(ray.available_resources().get("CPU", 0))
    return max(1, min(wanted, free_cpus)), {"num_cpus": 1}


def answer_in_process(queries: list[Query], export_dir: str, max_new_tokens: int,
                      batch_size: int, num_actors: int) -> dict[str, str]:
    import ray

    size, resources = actor_pool_size(num_actors)
    log.info("evaluating %d prompts with %d Ray Data actor(s)", len(queries), size)
    answered = (
        ray.data.from_items([asdict(q) for q in queries],
                            override_num_blocks=max(1, min(len(queries) // batch_size + 1, 4 * size)))
        .map_batches(ExportAnswerer, fn_constructor_args=(export_dir, max_new_tokens, batch_size),
                     batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=size), **resources)
        .take_all()
    )
    return {row["key"]: row["prediction"] for row in answered}


# --- a live endpoint (OpenAI protocol) --------------------------------------------------------------------------


def data_url(query: Query) -> str:
    mime = mimetypes.guess_type(query.image_path)[0] if query.image_path and not query.blank else "image/png"
    return f"data:{mime or 'image/png'};base64," + base64.b64encode(image_bytes(query)).decode()


def chat_body(query: Query, model: str, max_new_tokens: int) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(query)}}, {"type": "text", "text": query.text}]
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_new_tokens, "temperature": 0}


def completions_url(base: str) -> str:
    base = base.rstrip("/")
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


def ask_endpoint(session: requests.Session, query: Query, endpoint: EvalEndpointSettings,
                 max_new_tokens: int) -> str:
    response = session.post(completions_url(endpoint.url), json=chat_body(query, endpoint.model, max_new_tokens),
                            timeout=endpoint.timeout_s)
    if response.status_code != 200:
        raise RuntimeError(f"{endpoint.url} answered {response.status_code} to question {query.key!r}: "
                           f"{response.text[:500]}")
    return response.json()["choices"][0]["message"]["content"].strip()


def answer_by_endpoint(queries: list[Query], endpoint: EvalEndpointSettings, max_new_tokens: int) -> dict[str, str]:
    log.info("evaluating %d prompts through %s (%d in flight)", len(queries), endpoint.url, endpoint.concurrency)
    api_key = read_secret(endpoint.api_key_env, endpoint.api_key_file, "evaluate.endpoint.api_key_env/api_key_file")
    with requests.Session() as session, ThreadPoolExecutor(endpoint.concurrency) as pool:
        if api_key:
            session.headers["Authorization"] = f"Bearer {api_key}"
        answers = pool.map(lambda q: ask_endpoint(session, q, endpoint, max_new_tokens), queries)
        return {q.key: a for q, a in zip(queries, answers)}
