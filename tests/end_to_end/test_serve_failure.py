"""A replica's process is killed while requests are in flight: Serve starts a new one, requests after the recovery
succeed, and no request hangs past its client timeout. Requests caught by the failure may fail, with an HTTP error
status or a closed connection, never by hanging; the test counts them."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from llava_core.config import ServeSettings
from tests.ports import free_port

MODEL = "tiny-llava"
CLIENT_TIMEOUT_S = 30.0  # a new replica starts (imports torch, loads the model) in ~5-15 s here
REPLICA_CLASS = "ServeReplica:llava:LlavaServer"


@pytest.fixture(scope="module")
def server(ray_session, tiny_llava_dir):
    from llava_core.serve.client import deploy, shutdown

    # Health checks every second: Serve notices the dead replica quickly (the default of 5 s would do, slower).
    settings = ServeSettings(port=free_port(), max_batch_size=8, batch_wait_timeout_s=0.05, max_queued_requests=-1,
                             health_check_period_s=1)
    yield deploy(tiny_llava_dir, settings, MODEL)
    shutdown()


def body(max_tokens: int = 24) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Describe the picture in detail."}]}


def replica_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # This session's cluster, named explicitly: other Ray instances may run on the same machine.
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", REPLICA_CLASS), ("state", "=", "ALIVE")])
    return [actor.pid for actor in actors]


class Load:
    """Clients that keep sending requests, each with a client timeout, and record how every request ended."""

    def __init__(self, url: str, clients: int):
        self.url, self.stop, self.results = url, threading.Event(), []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def client(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                response = session.post(f"{self.url}/v1/chat/completions", json=body(), timeout=CLIENT_TIMEOUT_S)
                outcome = response.status_code
            except requests.Timeout:
                outcome = "timeout"
            except requests.ConnectionError:
                outcome = "connection closed"
                session = requests.Session()
            with self.lock:
                self.results.append((started, time.monotonic() - started, outcome))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=CLIENT_TIMEOUT_S + 5)


def wait_for_new_replica(old_pid: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [pid for pid in replica_pids() if pid != old_pid]
        if pids:
            return pids[0]
        time.sleep(0.5)
    raise AssertionError(f"no new replica within {timeout_s}s")


def test_killed_replica_is_replaced_and_requests_recover(server):
    [old_pid] = replica_pids()

    with Load(server, clients=4) as load:
        time.sleep(2.0)  # requests are in flight, some in a batch
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        new_pid = wait_for_new_replica(old_pid, timeout_s=40)
        # The new replica loads the model in the background; requests wait for it instead of failing.
        deadline = time.monotonic() + 30
        while requests.get(f"{server}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the new replica never became ready"
            time.sleep(0.2)
        recovered_at = time.monotonic()
        time.sleep(2.0)  # keep the load on after the recovery

    after = [requests.post(f"{server}/v1/chat/completions", json=body(4), timeout=CLIENT_TIMEOUT_S)
             for _ in range(3)]
    assert [r.status_code for r in after] == [200] * 3
    assert all(r.json()["choices"][0]["message"]["content"] is not None for r in after)

    results = load.results
    before_kill = [outcome for started, took, outcome in results if started + took < killed_at]
    during = [outcome for started, took, outcome in results if started < recovered_at and started + took >= killed_at]
    later = [outcome for started, _, outcome in results if started >= recovered_at]
    failed = [outcome for outcome in during if outcome != 200]
    print(f"\nreplica {old_pid} killed, {new_pid} took over in {recovered_at - killed_at:.1f}s; requests: "
          f"{len(before_kill)} before, {len(during)} during ({len(failed)} failed: {sorted(map(str, failed))}), "
          f"{len(later)} after")

    assert new_pid != old_pid
    assert before_kill and set(before_kill) == {200}
    # Requests in flight at the kill either fail cleanly (checked below) or, when Serve's router retries them on the
    # new replica, succeed: both are fine. What the test needs is that some overlapped the outage.
    assert during, "no request overlapped the replica's death, so the test proved nothing"
    assert "timeout" not in {outcome for _, _, outcome in results}, "a request hung until its client timeout"
    assert all(took < CLIENT_TIMEOUT_S for _, took, _ in results)
    # Failures are clean: an HTTP error status or a closed connection, never a hang.
    assert all(outcome == "connection closed" or (isinstance(outcome, int) and outcome >= 500) for outcome in failed)
    assert later and set(later) == {200}
