"""The benchmarks' smoke runs, shared by tests/integration/test_benchmarks.py and tests/end_to_end/test_benchmarks.py.

Every script in benchmarks/ runs its own code path in `--smoke` mode (benchmarks/harness.py) and prints exactly one
line on stdout, its JSON summary, whose figures match the smoke sizes: benchmarks no test runs rot unseen. Each runs
as a user runs it, in its own process (`PYTHONPATH` the repo root, a temporary working directory); those that need Ray
start their own small local one. Figures are checked for shape and sanity, not speed: at smoke sizes they measure
nothing. gpu_step.py's smoke run (with --save) is tests/integration/test_gpu_step_benchmark.py."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def smoke(name: str, cwd, *args: str, timeout: int = 300) -> dict:
    """`benchmarks/<name>.py --smoke`'s summary; its stdout must hold that one line and nothing else."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("RAY_ADDRESS", None)  # its own Ray, never the test session's
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--smoke", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be the summary line alone, got: {done.stdout[-2000:]}"
    return json.loads(lines[0])


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def fraction(value) -> bool:
    return isinstance(value, (int, float)) and 0 <= value <= 1
