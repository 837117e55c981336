"""Evaluation throughput: prompts per second in-process (Ray Data actors) and through the served endpoint.

    PYTHONPATH=. python benchmarks/eval_throughput.py [--questions 200] [--actors 2] [--batch-size 32]
        [--max-new-tokens 8] [--export runs/quickstart/export --eval-dir data/quickstart] [--smoke]

Without --export it builds an untrained tiny LLaVA and a synthetic eval set in a temporary directory (an untrained
model always decodes the full --max-new-tokens, the worst case). Each prompt is answered twice (with the image and
with the blind baseline's blank image). The last line is one JSON object: timings, prompts/s and the fraction of
answers on which the two backends agree (1.0 expected).

--smoke: 4 questions, 1 actor, 2 new tokens, 2 concurrent requests (benchmarks/harness.py).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_export(root: str, questions: int) -> tuple[str, str]:
    from llava_core.model.build import assemble
    from llava_core.quickstart import standins, synthetic

    paths = synthetic.generate(root, align_rows=32, instruct_rows=32, eval_questions=questions, text_only_rows=2,
                               seed=3)
    rows = json.load(open(paths["align"])) + json.load(open(paths["instruct"]))
    corpus = [turn["value"] for row in rows for turn in row["conversations"]]
    vision, llm = os.path.join(root, "models", "vision"), os.path.join(root, "models", "llm")
    standins.save_tiny_models(vision, llm, corpus, standins.TinyModelConfig())
    model, processor = assemble("llava", vision, llm)
    export = os.path.join(root, "export")
    model.save_pretrained(export)
    processor.save_pretrained(export)
    return export, root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--export")
    parser.add_argument("--eval-dir", help="a folder with eval/questions.jsonl, eval/answers.jsonl and images/")
    args = harness.parse_args(parser, smoke={"questions": 4, "actors": 1, "batch_size": 4, "max_new_tokens": 2,
                                             "concurrency": 2})

    import ray

    from llava_core.config import EvalEndpointSettings, EvaluateSettings, ServeSettings
    from llava_core.eval.evaluate import run_evaluate
    from llava_core.serve.client import deploy, shutdown

    tmp = tempfile.mkdtemp(prefix="eval_bench_")
    export, eval_dir = (args.export, args.eval_dir) if args.export else tiny_export(tmp, args.questions)
    settings = EvaluateSettings(questions=os.path.join(eval_dir, "eval", "questions.jsonl"),
                                answers=os.path.join(eval_dir, "eval", "answers.jsonl"),
                                image_folder=os.path.join(eval_dir, "images"), max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, num_actors=args.actors, report_examples=2)
    ray.init(num_cpus=os.cpu_count(), configure_logging=False, log_to_driver=False)

    started = time.time()
    local = run_evaluate(export, settings, os.path.join(tmp, "in_process"))
    in_process_s = time.time() - started

    url = deploy(export, ServeSettings(port=free_port(), max_batch_size=args.concurrency), "bench")
    try:
        from dataclasses import replace

        remote_settings = replace(settings, endpoint=EvalEndpointSettings(url=url, model="bench",
                                                                          concurrency=args.concurrency))
        started = time.time()
        remote = run_evaluate(export, remote_settings, os.path.join(tmp, "endpoint"))
        endpoint_s = time.time() - started
    finally:
        shutdown()

    def answers(folder):
        rows = [json.loads(line) for line in open(os.path.join(tmp, folder, "main", "predictions.jsonl"))]
        return [a for r in rows for a in (r["prediction"], r["blind_prediction"])]

    mine, theirs = answers("in_process"), answers("endpoint")
    prompts = len(mine)
    harness.print_summary({
        "benchmark": "eval_throughput", "prompts": prompts, "cpus": os.cpu_count(), "actors": args.actors,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency,
        "in_process_s": round(in_process_s, 1), "in_process_prompts_per_s": round(prompts / in_process_s, 2),
        "endpoint_s": round(endpoint_s, 1), "endpoint_prompts_per_s": round(prompts / endpoint_s, 2),
        "agreement": sum(a == b for a, b in zip(mine, theirs)) / prompts,
        "accuracy": [local["accuracy"], remote["accuracy"]],
    })


if __name__ == "__main__":
    main()
