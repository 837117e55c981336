"""`serve.engine: vllm` against vLLM's own OpenAI server: the same export, the same vLLM engine settings and the same
image requests from N concurrent clients. vLLM's own server (`python -m vllm.entrypoints.openai.api_server`) stays
up while llava-ray's deployment runs beside it, first with `serve.vllm.direct_streaming` (HAProxy, the LLM server as
Serve's ingress), then with Ray's default ingress replica; rounds alternate between the two servers. The last line
printed is one JSON object:

    {"direct_streaming": {"vllm_server": {"rps", "p50_s", "p99_s", "errors", ...}, "llava_ray": {...},
                          "ratio": median of the rounds' ours / vLLM's rps, "rounds_ratio": [...]},
     "default": {...}, "ratio": the first path's ratio, ...}   (a path only where `--paths` names it)

Usage: PYTHONPATH=. python benchmarks/serve_vllm_load.py [--clients 16] [--requests 160] [--max-tokens 16]
    [--rounds 9] [--paths direct_streaming default] [--smoke]
--smoke: 2 clients, 4 requests of 2 tokens, 1 round, the direct streaming path only (benchmarks/harness.py; the
default path's deployment runs in tests/end_to_end/test_serve_vllm.py); vLLM's start-up still takes minutes.
Needs the vLLM environment (`make readers` builds `.venv-vllm`, cluster/vllm-cpu-env.sh); runs on CPU with vLLM's CPU
build. The tiny model is built from configs and written by the export's own writer; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time

import harness
import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_load import MODEL, build_tiny_llava, free_port, request_bodies, run_phase  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PYTHON = os.path.join(ROOT, ".venv-vllm", "bin", "python")
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
ENGINE_ARGS = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True}
PATHS = {"direct_streaming": True, "default": False}  # llava-ray's ways to serve vLLM: `serve.vllm.direct_streaming`


def wait_for_models(url: str, timeout_s: float, process=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {process.returncode}")
        try:
            if requests.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url}/v1/models did not answer within {timeout_s:.0f}s")


def summary(results: list[dict]) -> dict:
    """The round of median throughput, with every round's requests/s."""
    ordered = sorted(results, key=lambda r: r["rps"])
    return {**ordered[len(ordered) // 2], "rounds_rps": [r["rps"] for r in results]}


def paired_rounds(theirs: str, ours: str, bodies: list[dict], clients: int, timeout_s: float, rounds: int) -> dict:
    """Rounds of all `bodies` against both servers in turn (the order swapped each round), after a warm-up of each
    (the first batches compile and allocate). One round lasts seconds, and a busy moment of a shared 2-core machine
    moves it: pairing rounds that ran moments apart, and taking the median of their ratios, cancels what drifts."""
    for url in (theirs, ours):
        run_phase(url, bodies[:clients], clients, timeout_s)
    pairs = []
    for i in range(rounds):
        order = (theirs, ours) if i % 2 == 0 else (ours, theirs)
        first, second = (run_phase(url, bodies, clients, timeout_s) for url in order)
        pairs.append((first, second) if i % 2 == 0 else (second, first))
    ratios = sorted(o["rps"] / t["rps"] for t, o in pairs)
    return {"vllm_server": summary([t for t, _ in pairs]), "llava_ray": summary([o for _, o in pairs]),
            "ratio": round(ratios[len(ratios) // 2], 3), "rounds_ratio": [round(r, 3) for r in ratios]}


@contextlib.contextmanager
def vllm_server(model_dir: str):
    """vLLM's own OpenAI server (the module entry point: the `vllm` command looks up a distribution named `vllm`,
    and the CPU build's is `vllm-cpu`), started; yields its URL and a function that waits until it answers, so that
    its start-up (~1 min on 2 cores) runs while llava-ray's deployment starts."""
    port = free_port()
    flags = [f"--{key.replace('_', '-')}" + ("" if value is True else f"={value}")
             for key, value in ENGINE_ARGS.items()]
    server = subprocess.Popen([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), *flags],
                              env={**os.environ, **ENGINE_ENV, "PYTHONPATH": ""}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        yield url, lambda: wait_for_models(url, 300, server)
    finally:
        server.terminate()
        server.wait(60)


@contextlib.contextmanager
def llava_ray_vllm(model_dir: str, clients: int, direct_streaming: bool):
    """`serve.engine: vllm` deployed as the workflow's serve stage deploys it, on a Ray started here, with HAProxy as
    Serve's proxy (`RAY_SERVE_ENABLE_HA_PROXY`, read when Serve starts) where `direct_streaming` needs it; yields
    its URL."""
    import ray

    from llava_core.config import serve_settings_from_dict
    from llava_core.serve.client import deploy, shutdown

    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if direct_streaming else "0"
    ray.init(num_cpus=max(2, os.cpu_count() or 2), configure_logging=False, log_to_driver=False)
    settings = serve_settings_from_dict({
        "engine": "vllm", "port": free_port(), "gpus_per_replica": 0, "max_ongoing_requests": 4 * clients,
        "max_queued_requests": -1, "vllm": {"python": VLLM_PYTHON, "env_vars": ENGINE_ENV,
                                            "engine_kwargs": ENGINE_ARGS, "direct_streaming": direct_streaming}})
    try:
        yield deploy(model_dir, settings, MODEL)
    finally:
        shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--timeout-s", type=float, default=120)
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    args = harness.parse_args(parser, smoke={"clients": 2, "requests": 4, "max_tokens": 2, "rounds": 1,
                                             "paths": ["direct_streaming"]})
    if not os.path.exists(VLLM_PYTHON):
        sys.exit(f"{VLLM_PYTHON} is missing: `make readers` builds it")
    bodies = request_bodies(args.requests, args.max_tokens)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        model_dir = build_tiny_llava(root)
        with vllm_server(model_dir) as (theirs, wait_until_up):
            for path in args.paths:
                with llava_ray_vllm(model_dir, args.clients, PATHS[path]) as ours:
                    wait_until_up()
                    results[path] = paired_rounds(theirs, ours, bodies, args.clients, args.timeout_s, args.rounds)
    harness.print_summary({**results, "ratio": results[args.paths[0]]["ratio"], "clients": args.clients,
                      "requests": args.requests, "max_tokens": args.max_tokens, "engine_args": ENGINE_ARGS})

if __name__ == "__main__":
    main()
