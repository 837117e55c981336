"""`llava-ray validate` run as a user runs it, shared by tests/unit/test_workflow_checks.py and
tests/end_to_end/test_workflow_checks.py."""
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def validate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_core.cli", "validate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
