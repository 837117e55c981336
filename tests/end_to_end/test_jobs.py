"""`llava-ray submit | status | logs` against a real Ray head with its dashboard (Jobs SDK), started by the test."""
import json
import os
import subprocess
import sys

import pytest

from tests.ray_cluster import local_ray_cluster

QUICKSTART = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "workflows", "quickstart.yaml"))
CLI = [sys.executable, "-m", "llava_core.cli"]
SMALL = ["synthetic.tiny_model.tower_pretraining_steps=0",  # a random tower: accuracy is not tested here
         "synthetic.align_rows=24", "synthetic.instruct_rows=24", "synthetic.eval_questions=4",
         "synthetic.text_only_rows=2", "synthetic.description_rows=0", "synthetic.preference_pairs=8",
         "synthetic.preference_eval_pairs=4", "synthetic.describe_questions=4", "prepare.max_reject_fraction=0.2"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with local_ray_cluster(str(tmp_path_factory.mktemp("ray-head")), nodes=1, cpus_per_node=2) as (_, dashboard):
        yield dashboard


def test_submit_runs_the_workflow_as_a_ray_job_and_status_and_logs_follow_it(head, tmp_path):
    storage = str(tmp_path / "runs")
    overrides = [a for o in [f"storage={storage}", "ray_address=auto", *SMALL] for a in ("--set", o)]
    submitted = cli("submit", QUICKSTART, "--address", head, "--only", "prepare", "--job-id", "llava-test-1",
                    "--wait", *overrides, timeout=400)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "submitted llava-test-1" in submitted.stdout and "job llava-test-1: SUCCEEDED" in submitted.stdout

    status = cli("status", "llava-test-1", "--address", head)
    assert status.returncode == 0 and "llava-test-1  SUCCEEDED" in status.stdout
    logs = cli("logs", "llava-test-1", "--address", head)
    assert "[prepare] finished" in logs.stdout
    # The job ran on the cluster and wrote into the workflow's storage: every source row accounted for.
    manifest = json.load(open(os.path.join(storage, "quickstart", "prepare", "manifest.json")))
    instruct = manifest["datasets"]["instruct"]
    assert instruct["rows_in"] == 24 + 2 + 2 and instruct["rows_rejected"] == 2
    assert instruct["rows_written"] == 24 + 2


def test_a_bad_workflow_is_refused_before_anything_is_submitted(head):
    refused = cli("submit", QUICKSTART, "--address", head, "--set", "instruct.lrr=1")
    assert refused.returncode == 2 and "instruct.lrr: unknown key (did you mean 'lr'?)" in refused.stderr
    listed = cli("status", "--address", head)
    assert "instruct.lrr" not in listed.stdout
