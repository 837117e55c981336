"""The prepare stage reads the same dataset from S3 (a real S3 protocol server) as from local files: identical
shards (the stage on local files: tests/integration/test_prepare.py)."""
import json
import os

import pyarrow.parquet as pq
import pytest

from tests.prepare_helpers import expected_rejects, prepare


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 protocol server (moto) on a free loopback port; this process's AWS_* variables point at it."""
    from tests.s3_server import environment, s3_server as start_s3_server

    with start_s3_server() as env, environment(env):
        yield env["AWS_ENDPOINT_URL"]


def _upload(folder: str, bucket: str) -> str:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            s3.upload_file(path, bucket, os.path.relpath(path, folder))
    return f"s3://{bucket}"


def _shard_rows(entry) -> list[dict]:
    table = pq.read_table(entry["shards"]).drop_columns(["source"])  # the source path is the one thing that differs
    return table.to_pylist()  # in the shards' order: the same source gives the same order


def test_the_same_preparation_from_s3_gives_identical_shards(ray_session, tiny_dataset, dirty_dataset, s3_server,
                                                              tmp_path):
    local_entry, _ = prepare(dirty_dataset, tiny_dataset, tmp_path / "local")
    bucket = _upload(os.path.dirname(dirty_dataset["path"]), "llava-dirty")
    s3_entry, _ = prepare(dirty_dataset, tiny_dataset, tmp_path / "s3", path=f"{bucket}/data.json",
                           image_folder=f"{bucket}/images")
    assert _shard_rows(s3_entry) == _shard_rows(local_entry)
    rejects = [json.loads(line) for line in open(tmp_path / "s3" / "mix" / "rejects.jsonl")]
    assert {r["id"]: r["reason"] for r in rejects} == expected_rejects(dirty_dataset)
    assert {r["source"] for r in rejects} == {f"{bucket}/data.json"}
    assert {k: s3_entry[k] for k in ("rows_in", "rows_written", "rows_rejected", "rejected_by_reason")} == \
        {k: local_entry[k] for k in ("rows_in", "rows_written", "rows_rejected", "rejected_by_reason")}
