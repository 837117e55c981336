"""A clean S3 environment, shared by tests/unit/test_storage.py and tests/integration/test_storage.py (the fixture
reaches them through tests/conftest.py's pytest_plugins)."""
import pytest

from llava_core import storage


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
