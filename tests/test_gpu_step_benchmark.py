"""benchmarks/gpu_step.py runs the worker loop's pieces; on CPU its --tiny mode checks the script (the GPU figure is
in the issue notes): it prints its JSON before any save, and a checkpoint only when asked."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_gpu_step_tiny_prints_its_figures_then_saves_only_when_asked():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_step.py"), "--tiny", "--steps", "3",
                           "--warmup", "1", "--save"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    figures, saved = lines
    assert figures["llm_layers"] == 2 and figures["attn"] == "sdpa" and figures["mfu"] is None  # no peak on CPU
    assert figures["step_s"] > 0 and figures["tokens_per_s"] > 0
    assert saved["checkpoint_s"] > 0
