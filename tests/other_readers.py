"""The export's other readers, each in its own environment (`make readers` builds them): transformers 4.57 in
`.venv-hf4`, vLLM's CPU build (and transformers 5.1x with torchvision) in `.venv-vllm`. The scripts in tests/readers/
run there, import nothing of this project, and print one JSON line."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")  # transformers 5.2x, run as any user runs it
HF4_PYTHON = os.path.join(ROOT, ".venv-hf4", "bin", "python")
VLLM_PYTHON = os.path.join(ROOT, ".venv-vllm", "bin", "python")
TRANSFORMERS_READER = os.path.join(ROOT, "tests", "readers", "transformers_reader.py")
VLLM_READER = os.path.join(ROOT, "tests", "readers", "vllm_reader.py")


def run_reader(python: str, script: str, *args: str) -> dict:
    """The JSON line `script` prints when another environment's Python runs it (nothing of this project on its
    path)."""
    if not os.path.exists(python):
        pytest.fail(f"{python} is missing: `make readers` (part of `make test`) builds it")
    result = subprocess.run([python, script, *args], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["imported_llava_core"]
    return report


def write_questions(path: str, texts: list[str], images: list[str]) -> str:
    """The questions file the reader scripts take: [{"text", "image"}, ...] (image: a file)."""
    with open(path, "w") as f:
        json.dump([{"text": text, "image": image} for text, image in zip(texts, images)], f)
    return path


def agreement(ours: list[str], theirs: list[str]) -> float:
    assert len(ours) == len(theirs) > 0
    return sum(a == b for a, b in zip(ours, theirs)) / len(ours)
