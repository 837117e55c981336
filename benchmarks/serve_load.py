"""Load on the serving endpoint: N concurrent clients against one replica of a tiny model, then the same requests one at
a time. Dynamic batching is what makes the first phase faster; the last line printed is one JSON object:

    {"concurrent": {"rps", "p50_s", "p99_s", "errors", "requests", "wall_s"}, "sequential": {...},
     "speedup": concurrent rps / sequential rps, "clients", "max_tokens"}

Usage: PYTHONPATH=. python benchmarks/serve_load.py [--clients 16] [--requests 96] [--max-tokens 16] [--smoke]
--smoke: 2 clients, 4 requests of 2 tokens (benchmarks/harness.py).
The tiny model is built from configs in a temporary directory (as the tests' `tiny_llava_dir`), nothing is downloaded.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import harness
import requests
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

MODEL = "tiny-llava"


def build_tiny_llava(root: str) -> str:
    import torch

    from llava_core.model.build import assemble
    from llava_core.quickstart import standins, synthetic
    from llava_core.train.save import save_hf_model

    paths = synthetic.generate(os.path.join(root, "data"), align_rows=64, instruct_rows=64, eval_questions=16,
                               text_only_rows=4, seed=1)
    rows = json.load(open(paths["align"])) + json.load(open(paths["instruct"]))
    corpus = [turn["value"] for row in rows for turn in row["conversations"]]
    vision, llm = os.path.join(root, "vision"), os.path.join(root, "llm")
    standins.save_tiny_models(vision, llm, corpus, standins.TinyModelConfig())
    model, processor = assemble("llava", vision, llm)
    out = os.path.join(root, "tiny_llava")
    save_hf_model(model, processor, out, torch.float32)  # as the stages export it: the layout vLLM reads
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_url(index: int) -> str:
    colour = ((index * 53) % 256, (index * 97) % 256, (index * 31) % 256)
    image = Image.new("RGB", (40 + index % 24, 32), (20, 20, 20))
    image.paste(Image.new("RGB", (16, 12), colour), (8, 6))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_bodies(count: int, max_tokens: int) -> list[dict]:
    return [{
        "model": MODEL, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url(i)}},
            {"type": "text", "text": f"What colour is shape {i}?"}]}],
    } for i in range(count)]


def send(session: requests.Session, url: str, body: dict, timeout_s: float) -> tuple[float, bool]:
    started = time.perf_counter()
    try:
        response = session.post(f"{url}/v1/chat/completions", json=body, timeout=timeout_s)
        ok = response.status_code == 200 and bool(response.json()["choices"][0]["finish_reason"])
    except (requests.RequestException, ValueError, KeyError):
        ok = False
    return time.perf_counter() - started, ok


def run_phase(url: str, bodies: list[dict], clients: int, timeout_s: float) -> dict:
    sessions = [requests.Session() for _ in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda ib: send(sessions[ib[0] % clients], url, ib[1], timeout_s),
                                enumerate(bodies)))
    wall = time.perf_counter() - started
    latencies = sorted(latency for latency, _ in results)
    return {
        "rps": round(len(bodies) / wall, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "errors": sum(not ok for _, ok in results),
        "requests": len(bodies),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-wait-s", type=float, default=0.05)
    parser.add_argument("--timeout-s", type=float, default=120)
    args = harness.parse_args(parser, smoke={"clients": 2, "requests": 4, "max_tokens": 2})

    import ray

    from llava_core.config import ServeSettings
    from llava_core.serve.client import deploy, shutdown

    with tempfile.TemporaryDirectory() as root:
        model_dir = build_tiny_llava(root)
        ray.init(num_cpus=max(2, os.cpu_count() or 2), configure_logging=False, log_to_driver=False)
        settings = ServeSettings(port=free_port(), max_batch_size=args.clients, batch_wait_timeout_s=args.batch_wait_s,
                                 max_ongoing_requests=2 * args.clients, max_queued_requests=-1,
                                 max_tokens_limit=max(64, args.max_tokens))
        url = deploy(model_dir, settings, MODEL)
        try:
            bodies = request_bodies(args.requests, args.max_tokens)
            run_phase(url, bodies[:args.clients], args.clients, args.timeout_s)  # warm-up: first batches are slow
            concurrent = run_phase(url, bodies, args.clients, args.timeout_s)
            sequential = run_phase(url, bodies, 1, args.timeout_s)
        finally:
            shutdown()
            ray.shutdown()
    result = {"concurrent": concurrent, "sequential": sequential,
              "speedup": round(concurrent["rps"] / sequential["rps"], 2),
              "clients": args.clients, "max_tokens": args.max_tokens}
    harness.print_summary(result)


if __name__ == "__main__":
    main()
