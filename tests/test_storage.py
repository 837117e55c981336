"""S3 and local storage: one client per process and settings, regions resolved; remote model directories mirrored
for `from_pretrained` (a rewritten directory is fetched again, never stale)."""
import os

import pytest

from llava_core import storage
from tests.s3_server import environment, s3_server

pytestmark = pytest.mark.unit


@pytest.mark.integration
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


@pytest.fixture
def clean_s3(monkeypatch):
    """No S3 settings from this machine, and no clients or regions cached by an earlier test."""
    for name in storage.S3_SETTING_VARS + storage.S3_CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)
    storage._s3_client.cache_clear()
    storage.bucket_region.cache_clear()
    yield monkeypatch
    storage._s3_client.cache_clear()
    storage.bucket_region.cache_clear()


class Recorder:
    """Stands in for pafs.S3FileSystem: keeps the arguments each client was made with."""

    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return object()


@pytest.mark.integration
def test_one_client_serves_every_path_of_a_bucket_and_a_round_trip_works(clean_s3):
    with s3_server("client-test") as env, environment(env):
        first, inner = storage.filesystem("s3://client-test/runs/a.json")
        second, _ = storage.filesystem("s3://client-test/images/b.jpg")
        assert first is second and inner == "client-test/runs/a.json"
        storage.write_json("s3://client-test/runs/a.json", {"rows": 3})
        assert storage.read_json("s3://client-test/runs/a.json") == {"rows": 3}
        assert storage.list_files("s3://client-test/runs") == ["s3://client-test/runs/a.json"]
        with environment({"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}):
            assert storage.filesystem("s3://client-test/runs/a.json")[0] is not first  # another server
        with environment({"AWS_ACCESS_KEY_ID": "rotated"}):
            assert storage.filesystem("s3://client-test/runs/a.json")[0] is not first  # other keys
        assert storage.filesystem("s3://client-test/runs/a.json")[0] is first  # back as it was


def test_aws_region_wins_over_aws_default_region(clean_s3):
    clean_s3.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    clean_s3.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert storage.filesystem("s3://bucket/key")[0].region == "us-west-2"
    clean_s3.setenv("AWS_REGION", "eu-central-1")
    assert storage.filesystem("s3://bucket/key")[0].region == "eu-central-1"
    assert storage.s3_env()["AWS_REGION"] == "eu-central-1"  # Ray workers get it too


def test_credentials_never_travel_in_a_runtime_env(clean_s3):
    """What every runtime_env the project builds carries (pipeline, export, base models, serve replicas)."""
    for name, value in {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1",
                        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
                        "AWS_SESSION_TOKEN": "t0ken"}.items():
        clean_s3.setenv(name, value)
    assert storage.s3_env() == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1"}


def test_a_custom_endpoint_without_region_gets_no_forced_region(clean_s3):
    recorder = Recorder()
    clean_s3.setattr(storage.pafs, "S3FileSystem", recorder)
    clean_s3.setattr(storage.pafs, "resolve_s3_region", lambda bucket: pytest.fail("asked AWS for a MinIO bucket"))
    clean_s3.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    storage.filesystem("s3://bucket/key")
    assert recorder.calls == [{"endpoint_override": "http://minio:9000"}]


def test_without_region_or_endpoint_the_bucket_is_asked_once(clean_s3):
    asked = []
    clean_s3.setattr(storage.pafs, "resolve_s3_region", lambda bucket: asked.append(bucket) or "ap-southeast-2")
    clean_s3.setenv("AWS_ACCESS_KEY_ID", "key")
    clean_s3.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    fs, _ = storage.filesystem("s3://far-away/a.json")
    assert fs.region == "ap-southeast-2"
    assert storage.filesystem("s3://far-away/images/b.jpg")[0] is fs
    storage.filesystem("s3://other-bucket/c.json")
    assert asked == ["far-away", "other-bucket"]


@pytest.mark.integration
def test_without_weights_copies_only_the_small_files(tmp_path):
    with s3_server("cache-test") as env, environment(env):
        remote = "s3://cache-test/hub/lmsys/vicuna-7b-v1.5"
        for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "pytorch_model-00001-of-00002.bin",
                     "pytorch_model.bin.index.json", "model.safetensors"):
            storage.write_text(storage.join(remote, name), name)
        small = storage.local_copy(remote, str(tmp_path), without_weights=True)
        assert sorted(os.listdir(small)) == ["config.json", "pytorch_model.bin.index.json", "tokenizer.model",
                                             "tokenizer_config.json"]
        full = storage.local_copy(remote, str(tmp_path))
        assert full != small and len(os.listdir(full)) == 6  # a full copy is never served from the small one


@pytest.mark.integration
def test_processes_of_one_node_download_a_model_once(tmp_path, monkeypatch):
    """8 ranks of a GPU node asking at once: one downloads, the others wait for its copy (one file lock)."""
    import threading

    with s3_server("cache-test") as env, environment(env):
        remote = "s3://cache-test/runs/r/instruct/model"
        storage.write_text(storage.join(remote, "config.json"), "{}")
        copies, real_copy = [], storage.copy_dir

        def counted_copy(src, dst):
            copies.append(src)
            real_copy(src, dst)
        monkeypatch.setattr(storage, "copy_dir", counted_copy)
        results = []
        threads = [threading.Thread(target=lambda: results.append(storage.local_copy(remote, str(tmp_path))))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(results)) == 1 and len(results) == 4
        assert copies == [remote]
