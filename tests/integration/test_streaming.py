"""Training rows stream from S3 (a real S3 protocol server) exactly as from local shards: the same rows, the same
micro-batches as collated in memory (the rest of streaming: tests/unit/test_streaming.py)."""
from llava_core import storage
from llava_core.data.plan_index import write_plan_index
from llava_core.train.streaming import TrainingRows
from tests.s3_server import environment, s3_server
from tests.streaming_helpers import assert_same, assert_same_rows, expected_batches, in_memory, plan_for, streamed


def test_shards_stream_from_s3(shards):
    table = in_memory(shards)
    with s3_server("train-rows") as env, environment(env):
        remote = []
        for k, path in enumerate(shards):
            remote.append(f"s3://train-rows/prepare/rows/shard-{k}.parquet")
            fs, inner = storage.filesystem(remote[-1])
            with fs.open_output_stream(inner) as out, open(path, "rb") as f:
                out.write(f.read())
        index = "s3://train-rows/prepare/plan_index.parquet"
        write_plan_index(remote, index)
        rows = TrainingRows.open(remote, index)
        assert_same_rows(rows, TrainingRows.open(remote))
        plan, epoch_steps = plan_for(rows, packing=True)
        got = streamed(rows, plan, epoch_steps, 3, 1, packing=True)
    want = expected_batches(table, plan, epoch_steps, 3, 1, packing=True)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert_same(g, w)
