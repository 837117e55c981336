"""benchmarks/gpu_step.py runs the worker loop's pieces; on CPU its --smoke mode (--tiny, 3 steps) checks the script
(the GPU figure is in the issue notes): it prints its JSON before any save, and a checkpoint only when asked. The
other benchmarks' smoke runs are in tests/*/test_benchmarks.py."""
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_gpu_step_tiny_prints_its_figures_then_saves_only_when_asked():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_step.py"), "--smoke", "--save"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    figures, saved = (json.loads(line) for line in done.stdout.splitlines())  # stdout holds these two lines only
    assert figures["device"] == "cpu (--tiny)" and figures["steps"] == 3 and figures["warmup"] == 1
    assert figures["llm_layers"] == 2 and figures["attn"] == "sdpa" and figures["mfu"] is None  # no peak on CPU
    assert figures["peak_mem_gib"] is None
    assert figures["step_s"] > 0 and figures["tokens_per_s"] > 0
    assert saved["checkpoint_s"] > 0
