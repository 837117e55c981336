"""A real multi-process Ray cluster for tests: `ray start --block` heads and workers on loopback, on free ports.

Other Ray instances may run on this machine (the test session's own `ray.init`, other developers' runs), so every
port a node opens is chosen free here, and the cluster is stopped by ending its own `ray start` processes, never with
a machine-wide `ray stop`.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import requests

from tests.ports import free_port

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Ray 2.5x+ heads enable token authentication when a token exists (~/.ray/auth_token); a node joining with
# `ray start --address` and a driver connecting with ray.init must then be told so explicitly, as on a real cluster.
AUTH_ENV = {"RAY_AUTH_MODE": "token"}
PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


def _node_ports() -> list[str]:
    return [arg for flag in PORT_FLAGS for arg in (flag, str(free_port()))]


def _start(args: list[str], log_path: str, extra_env: dict) -> subprocess.Popen:
    log = open(log_path, "w")
    # Job entrypoints run `python ...` from PATH: make it this interpreter, as an activated venv or an image would.
    env = {**os.environ, **AUTH_ENV, **extra_env,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           # Ray 2.60 drains a node for up to 30 s on SIGTERM (for Serve during a RayService upgrade): a test's
           # cluster has nothing to hand over, and the wait was half a minute of each teardown.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    # A new session, so the whole node (raylet, GCS, dashboard, workers) can be ended as one process group.
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args, *_node_ports()],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for_dashboard(url: str, nodes: int, timeout_s: float = 120) -> None:
    from llava_core.submit import auth_headers

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reply = requests.get(f"{url}/nodes?view=summary", headers=auth_headers(), timeout=5)
            alive = [n for n in reply.json()["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]
            if len(alive) >= nodes:
                return
        except (requests.RequestException, KeyError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"the test Ray cluster at {url} did not come up with {nodes} nodes in {timeout_s:.0f}s")


def private_disk(tmp_dir: str, node: str) -> dict:
    """A node's own HOME and temp directory, as separate machines have: a path one node writes there (a model
    mirrored into ~/.cache, a temp file) does not exist for the others. What a real node's image or secret holds
    stays shared: the cluster's auth token (as a mounted secret) and the compiled DeepSpeed ops (as the image)."""
    home, tmp = os.path.join(tmp_dir, node, "home"), os.path.join(tmp_dir, node, "tmp")
    os.makedirs(home, exist_ok=True)
    os.makedirs(tmp, exist_ok=True)
    return {"HOME": home, "TMPDIR": tmp, "RAY_AUTH_TOKEN_PATH": cluster_token_path(),
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
            or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")}


def cluster_token_path() -> str:
    """This user's Ray token file, created if missing: every node and driver of a test cluster reads it."""
    path = os.path.expanduser("~/.ray/auth_token")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    return path


@contextlib.contextmanager
def local_ray_cluster(tmp_dir: str, nodes: int = 1, cpus_per_node: int = 1, env: dict | None = None,
                      private_disks: bool = False):
    """Yields (gcs_address, dashboard_url) of a cluster of `nodes` nodes on this machine. `env` is every node's
    environment on top of this process's (as a cluster's nodes get S3 credentials from their image or IAM role).
    With `private_disks` every node gets its own HOME and temp directory (`private_disk`)."""
    env = env or {}
    os.makedirs(tmp_dir, exist_ok=True)

    def node_env(name: str) -> dict:
        return {**env, **(private_disk(tmp_dir, name) if private_disks else {})}

    # Ray's own files go to a short path: its Unix sockets live there, and socket paths are limited to 107 bytes.
    ray_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    gcs_port, dashboard_port = free_port(), free_port()
    processes = [_start(["--head", f"--port={gcs_port}", f"--num-cpus={cpus_per_node}", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                         f"--ray-client-server-port={free_port()}", f"--temp-dir={ray_temp}"],
                        os.path.join(tmp_dir, "head.log"), node_env("head"))]
    gcs, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(dashboard, 1)
        for i in range(1, nodes):
            processes.append(_start([f"--address={gcs}", f"--num-cpus={cpus_per_node}"],
                                    os.path.join(tmp_dir, f"worker{i}.log"), node_env(f"worker{i}")))
        _wait_for_dashboard(dashboard, nodes)
        yield gcs, dashboard
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(ray_temp, ignore_errors=True)
