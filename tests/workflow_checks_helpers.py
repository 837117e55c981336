"""`llava-ray validate` run as a user runs it, shared by tests/unit/test_workflow_checks.py and
tests/end_to_end/test_workflow_checks.py."""
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# The recipes' run directories are in an example bucket (s3://my-bucket), which `--plan` tries for a prepare manifest.
# This machine reaches no AWS: without a region, finding the bucket's costs ~6 s of retries first (a region is set
# on a cluster: cluster/). The read still fails, quicker, and the plan counts rows as it does for any unread bucket.
OFFLINE_AWS = {"AWS_REGION": "us-east-1"}


def validate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_core.cli", "validate", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **OFFLINE_AWS}, timeout=120)
