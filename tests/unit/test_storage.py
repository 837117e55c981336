"""S3 and local storage without a server: local paths used where they are, regions resolved, no credentials in a
runtime_env (against a real S3 protocol server: tests/integration/test_storage.py)."""
import pytest

from llava_core import storage


def test_local_paths_are_used_where_they_are(tmp_path):
    assert storage.local_copy(str(tmp_path), "/nonexistent-cache") == str(tmp_path)


class Recorder:
    """Stands in for pafs.S3FileSystem: keeps the arguments each client was made with."""

    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return object()


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
