"""Remote model directories mirrored for `from_pretrained`: a rewritten directory is fetched again, never stale."""
import os

from llava_core import storage
from tests.s3_server import environment, s3_server


def test_a_rewritten_remote_directory_is_downloaded_again(tmp_path):
    with s3_server("cache-test") as env, environment(env):
        remote = "s3://cache-test/runs/quickstart/align/model"
        storage.write_text(storage.join(remote, "config.json"), '{"patch_size": 8}')
        storage.write_text(storage.join(remote, "weights.bin"), "old weights")
        first = storage.local_copy(remote, str(tmp_path))
        assert open(os.path.join(first, "config.json")).read() == '{"patch_size": 8}'
        assert storage.local_copy(remote, str(tmp_path)) == first  # unchanged: the same copy, not a new download

        storage.write_text(storage.join(remote, "config.json"), '{"patch_size": 16}')  # the stage ran again
        second = storage.local_copy(remote, str(tmp_path))
        assert second != first
        assert open(os.path.join(second, "config.json")).read() == '{"patch_size": 16}'
        assert sorted(os.listdir(second)) == ["config.json", "weights.bin"]
        assert not [name for name in os.listdir(os.path.dirname(second)) if name.startswith(".partial-")]


def test_local_paths_are_used_where_they_are(tmp_path):
    assert storage.local_copy(str(tmp_path), "/nonexistent-cache") == str(tmp_path)
