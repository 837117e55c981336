"""The quickstart on a real two-node Ray cluster (two `ray start` nodes on loopback, one training worker per node)
with its run directory in S3 (a moto server speaking the real S3 protocol): every stage's output of value lands in
the bucket, and the training workers really ran on both nodes. Small data, one instruct epoch: this checks where
things run and land, not what the model learns (tests/test_quickstart.py does that)."""
import json
import os
import subprocess
import sys

from tests.ports import free_port
from tests.ray_cluster import AUTH_ENV, local_ray_cluster
from tests.s3_server import environment, s3_server

QUICKSTART = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "workflows", "quickstart.yaml"))
SMALL = ["synthetic.tiny_model.tower_pretraining_steps=0",  # a random tower: accuracy is not tested here
         "synthetic.align_rows=64", "synthetic.instruct_rows=96", "synthetic.eval_questions=8",
         "synthetic.text_only_rows=4", "prepare.max_reject_fraction=0.05", "instruct.epochs=1",
         "evaluate.batch_size=8"]
VALUABLE = ["summary.json", "prepare/manifest.json", "prepare/stats.json", "prepare/lengths.png",
            "prepare/instruct/rejects.jsonl", "align/model/model.safetensors", "align/metrics.jsonl",
            "instruct/model/model.safetensors", "instruct/metrics.jsonl", "export/model.safetensors",
            "export/config.json", "export/processor_config.json", "export/tokenizer.json", "export/chat_template.jinja",
            "evaluate/metrics.json", "evaluate/report.html", "serve/demo.json"]


def training_worker_nodes(dashboard: str) -> set:
    """Nodes that hosted Ray Train workers, from the dashboard's state API (dead actors included)."""
    import requests

    from llava_core.submit import auth_headers

    reply = requests.get(f"{dashboard}/api/v0/actors", headers=auth_headers(), timeout=30, params={
        "filter_keys": "class_name", "filter_predicates": "=", "filter_values": "RayTrainWorker", "detail": "1",
        "limit": "100"})
    reply.raise_for_status()
    return {actor["node_id"] for actor in reply.json()["data"]["result"]["result"]}


def test_quickstart_on_two_nodes_with_its_run_directory_in_s3(tmp_path):
    from llava_core import storage

    with s3_server("llava-test") as s3_env, \
            local_ray_cluster(str(tmp_path / "ray"), nodes=2, cpus_per_node=1, env=s3_env) as (gcs, dashboard):
        overrides = ["storage=s3://llava-test/runs", f"ray_address={gcs}", f"serve.port={free_port()}", *SMALL]
        run = subprocess.run(
            [sys.executable, "-m", "llava_core.cli", "run", QUICKSTART, "--exit-after-serve",
             *[arg for o in overrides for arg in ("--set", o)]],
            cwd=tmp_path, env={**os.environ, **AUTH_ENV, **s3_env}, capture_output=True, text=True, timeout=1200)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        assert len(training_worker_nodes(dashboard)) == 2  # align's and instruct's workers, one per node

        with environment(s3_env):
            run_dir = "s3://llava-test/runs/quickstart"
            missing = [p for p in VALUABLE if not storage.exists(storage.join(run_dir, p))]
            assert not missing, f"not in the bucket: {missing}"
            summary = storage.read_json(storage.join(run_dir, "summary.json"))
            assert [summary[s]["status"] for s in ("prepare", "align", "instruct", "export", "evaluate", "serve")] \
                == ["done"] * 6
            manifest = storage.read_json(storage.join(run_dir, "prepare", "manifest.json"))
            shards = manifest["datasets"]["instruct"]["shards"]
            assert shards and all(s.startswith("s3://llava-test/runs/quickstart/prepare/") for s in shards)
            checkpoints = storage.list_files(storage.join(run_dir, "instruct", "ray"))
            assert any("checkpoint_" in path for path in checkpoints), "no Ray Train checkpoint in the bucket"
            assert summary["evaluate"]["questions"] == 8
            assert json.loads(storage.read_text(storage.join(run_dir, "serve", "demo.json")))["answer"] == \
                summary["serve"]["answer"]
        assert not (tmp_path / "runs").exists()  # nothing of the run went to local disk
