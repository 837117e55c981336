"""Training metrics synced to S3 (a real S3 protocol server) while the stage runs: every few steps, again after a
failed upload, and read back as the history a resumed stage starts from."""
import pytest
import requests

from llava_core import storage
from llava_core.train.metrics import MetricsWriter, read_history
from tests.s3_server import environment, s3_server
from tests.train_metrics_helpers import STAGE, eventually, read_events, records


@pytest.fixture(scope="module")
def s3():
    """One S3 server (bucket `metrics`) for this module's tests; yields its endpoint."""
    with s3_server("metrics") as env, environment(env):
        yield env["AWS_ENDPOINT_URL"]


def remote_history(stage_dir: str) -> list[dict]:
    return read_history(storage.read_text(storage.join(stage_dir, "metrics.jsonl")))


def test_metrics_reach_s3_every_few_steps_while_the_stage_runs(s3, tmp_path):
    stage_dir = "s3://metrics/runs/live/align"
    writer = MetricsWriter("align", STAGE, str(tmp_path / "tb"), stage_dir, history=[])
    for record in records(range(1, 13)):
        writer.write(record)
    # Steps 11 and 12 are after the last sync (step 10): the file holds exactly steps 1-10 until the end.
    assert eventually(lambda: remote_history(stage_dir), records(range(1, 11))) == records(range(1, 11))
    tensorboard = storage.join(stage_dir, "tensorboard")
    assert eventually(lambda: any("tfevents" in f for f in storage.list_files(tensorboard)), True)
    writer.close()
    assert remote_history(stage_dir) == records(range(1, 13))
    [events] = storage.list_files(storage.join(stage_dir, "tensorboard"))
    steps = [e.step for e in read_events(storage.read_bytes(events)) for v in e.summary.value if v.tag == "train/loss"]
    assert steps == list(range(1, 13))


def test_a_failed_upload_is_logged_and_the_next_sync_succeeds(s3, tmp_path, caplog):
    stage_dir = "s3://not-yet/runs/align"  # a bucket that does not exist until halfway through
    writer = MetricsWriter("align", STAGE, str(tmp_path / "tb"), stage_dir, history=[])
    with caplog.at_level("WARNING", logger="llava_core.train.metrics"):
        for record in records(range(1, 6)):
            writer.write(record)
        assert eventually(lambda: any("retrying at the next sync" in r.getMessage() for r in caplog.records), True)
    requests.put(f"{s3}/not-yet", timeout=10).raise_for_status()  # CreateBucket: the storage is back
    for record in records(range(6, 11)):
        writer.write(record)
    assert eventually(lambda: remote_history(stage_dir), records(range(1, 11))) == records(range(1, 11))
    writer.close()


def test_a_resumed_stage_file_starts_with_the_history_restored_from_its_checkpoint(s3, tmp_path):
    stage_dir = "s3://metrics/runs/resumed/align"
    first = MetricsWriter("align", STAGE, str(tmp_path / "tb1"), stage_dir, history=[])
    for record in records(range(1, 13)):  # the first attempt got to step 12, its last checkpoint was at step 8
        first.write(record)
    assert eventually(lambda: remote_history(stage_dir), records(range(1, 11))) == records(range(1, 11))
    restored = records(range(1, 9))  # then it died; a new worker resumes from the checkpoint
    again = [{**r, "loss": 0.5} for r in records(range(9, 11))]  # steps 9 and 10 once more, other numbers
    second = MetricsWriter("align", STAGE, str(tmp_path / "tb2"), stage_dir, history=restored)
    for record in again:
        second.write(record)
    assert eventually(lambda: remote_history(stage_dir), restored + again) == restored + again
    second.close()
    assert remote_history(stage_dir) == restored + again
    # TensorBoard drops the first attempt's events from step 9 on: the new events file starts a session there.
    files = storage.list_files(storage.join(stage_dir, "tensorboard"))
    starts = [[e.step for e in read_events(storage.read_bytes(f)) if e.HasField("session_log")] for f in files]
    assert [9] in starts
