"""A real S3 protocol server on loopback for tests of `s3://` paths: moto's server, started and stopped here."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import requests

from tests.ports import free_port

MOTO_SERVER = os.path.join(os.path.dirname(sys.executable), "moto_server")


@contextlib.contextmanager
def s3_server(bucket: str | None = None):
    """Yields the environment that points pyarrow, s3fs and boto at a fresh server (holding an empty `bucket`)."""
    port = free_port()
    server = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if bucket:
                    requests.put(f"{endpoint}/{bucket}", timeout=2).raise_for_status()  # CreateBucket
                else:
                    requests.get(endpoint, timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)


@contextlib.contextmanager
def environment(env: dict):
    """Set variables for this process (pyarrow reads them when a filesystem is created), restoring them after."""
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
