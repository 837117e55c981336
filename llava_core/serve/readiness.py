"""Waiting for a deployment to answer: how long a model of its size may take, and what Serve says when it does not.

A replica reports ready only once it has mirrored the export to its node and loaded it, which takes time in
proportion to the weights (a 7B export is ~14 GB to download and read); a fixed wait fails large models and makes a
broken small one wait for nothing. When the wait runs out, the error carries Serve's own view of the application
(replica states and messages), which says whether a replica is pending resources, starting, or failing to load.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from llava_core import storage
from llava_core.config import ServeSettings

BASE_WAIT_S = 120.0  # a replica process starts, imports torch and transformers, loads a small model
WAIT_S_PER_GB = 60.0  # mirroring from S3 and reading the weights: ~17 MB/s, slow on purpose (shared disks, busy nodes)


def weight_bytes(files: list[tuple]) -> int:
    """The size of the weight files in a `storage.listing` (name, size, ...)."""
    return sum(size for name, size, *_ in files if name.endswith(storage.WEIGHT_SUFFIXES))


def derived_timeout_s(weights: int) -> float:
    return BASE_WAIT_S + WAIT_S_PER_GB * weights / 1e9


def ready_timeout_s(settings: ServeSettings, model_dir: str) -> float:
    """`serve.ready_timeout_s`, or the wait the export's weights call for (a listing only: nothing is copied)."""
    if settings.ready_timeout_s is not None:
        return settings.ready_timeout_s
    return derived_timeout_s(weight_bytes(storage.listing(model_dir)))


def describe_status(status, app_name: str) -> str:
    """Serve's status of one application in a line, e.g. "application llava: DEPLOYING; deployment LlavaServer:
    UPDATING, 1 replica STARTING: ..." (`status` is what `ray.serve.status()` returns)."""
    app = status.applications.get(app_name)
    if app is None:
        return f"application {app_name}: not deployed"
    parts = [f"application {app_name}: {plain(app.status)}" + (f" ({app.message})" if app.message else "")]
    for name, deployment in app.deployments.items():
        replicas = ", ".join(f"{n} replica{'' if n == 1 else 's'} {plain(state)}"
                             for state, n in sorted(deployment.replica_states.items()) if n) or "no replicas"
        message = f": {deployment.message}" if deployment.message else ""
        parts.append(f"deployment {name}: {plain(deployment.status)}, {replicas}{message}")
    return "; ".join(parts)


def plain(state) -> str:
    # Serve's status holds its enums, except replica states, which arrive as plain strings.
    return getattr(state, "value", state)


def ready_answer(url: str, path: str = "/ready") -> tuple[int | None, str]:
    """The status code of `path` and its reason; None when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=5) as response:
            return response.status, "ready"
    except urllib.error.HTTPError as error:
        return error.code, error_message(error.read())
    except (urllib.error.URLError, OSError) as error:
        return None, f"no answer ({getattr(error, 'reason', error)})"


def error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


def wait_until_ready(url: str, app_name: str, timeout_s: float, path: str = "/ready") -> None:
    """Until the application is RUNNING (so no replica of an earlier deployment answers) and `path` says 200."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status()
        app = status.applications.get(app_name)
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"the deployment failed: {describe_status(status, app_name)}")
        code, reason = ready_answer(url, path)
        if code == 200 and app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{url}{path} did not answer 200 within {timeout_s:.0f}s (serve.ready_timeout_s); last answer: "
                f"{code or '-'} {reason}; {describe_status(status, app_name)}. If Serve was already running with "
                "other HTTP options, call shutdown() first")
        time.sleep(0.5)
