"""Submit a workflow to a Ray cluster as one Ray Job, and follow it (`llava-ray submit | status | logs`).

The job runs `llava-ray run <workflow>` on the cluster's head through the Jobs SDK. The workflow file travels in the
job's working directory; the project's own code travels as a `py_modules` entry, so the cluster runs exactly the
version that submitted it. Heavy dependencies (torch, ray, transformers, deepspeed) come from the cluster's image
(`cluster/Dockerfile`): installing them per job would take minutes on every submission.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def dashboard_address(address: str | None) -> str:
    """`--address`, else RAY_ADDRESS when it names a dashboard, else the local head's dashboard."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    return address if address.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def auth_headers() -> dict[str, str]:
    """Ray 2.5x+ clusters require a token by default (`ray get-auth-token`). Like Ray's own CLI, take it from
    RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; a cluster without token auth ignores the headers.

    Sent twice: Ray reads `Authorization`, and `X-Ray-Authorization` when that is absent, which is what arrives through
    the Kubernetes API server's service proxy (`kubectl proxy`, the way into the manifests' clusters): the API server
    consumes `Authorization` itself."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if not token and os.path.exists(path):
        with open(path) as f:
            token = f.read().strip()
    return {"Authorization": f"Bearer {token}", "X-Ray-Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_address(address), headers=auth_headers())


SECRET_NAME_PARTS = {"SECRET", "TOKEN", "PASSWORD", "KEY", "CREDENTIALS"}


def job_env(pairs: list[str]) -> dict[str, str]:
    """`--env` pairs, refusing names that look like secrets (AWS_SECRET_ACCESS_KEY, HF_TOKEN, LLAVA_RAY_API_KEY): a
    job's environment is part of its runtime_env, which the dashboard shows to anyone who opens it."""
    env = dict(pair.split("=", 1) for pair in pairs)
    for name in env:
        if SECRET_NAME_PARTS & set(name.upper().split("_")):
            raise ValueError(f"--env {name}: looks like a secret, and a job's environment is shown in the Ray "
                             "dashboard; give it to the cluster's nodes instead (a Kubernetes secret in every pod's "
                             "env, an instance role), where every process of the job reads it")
    return env


def stage_working_dir(workflow_path: str) -> str:
    """A fresh directory holding only the workflow file: the job's working directory (small, fast to upload)."""
    directory = tempfile.mkdtemp(prefix="llava-ray-job-")
    shutil.copy(workflow_path, os.path.join(directory, os.path.basename(workflow_path)))
    return directory


def runtime_env(working_dir: str, env_vars: dict[str, str], pip: list[str]) -> dict:
    import llava_core

    env = {
        "working_dir": working_dir,
        "py_modules": [os.path.dirname(os.path.abspath(llava_core.__file__))],
        "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **env_vars},
    }
    if pip:
        env["pip"] = pip
    return env


def entrypoint(workflow_path: str, overrides: list[str], stage_args: list[str]) -> str:
    import shlex

    parts = ["python", "-m", "llava_core.cli", "run", os.path.basename(workflow_path), "--exit-after-serve"]
    for override in overrides:
        parts += ["--set", override]
    return " ".join(shlex.quote(p) for p in parts + stage_args)


def submit(workflow_path: str, address: str | None, overrides: list[str], stage_args: list[str],
           env_vars: dict[str, str], pip: list[str], submission_id: str | None = None) -> str:
    """Submit the workflow; returns the job's submission id."""
    working_dir = stage_working_dir(workflow_path)
    try:
        return client(address).submit_job(
            entrypoint=entrypoint(workflow_path, overrides, stage_args),
            runtime_env=runtime_env(working_dir, env_vars, pip),
            submission_id=submission_id,
            metadata={"workflow": os.path.basename(workflow_path), "submitted_by": "llava-ray"},
        )
    finally:
        shutil.rmtree(working_dir, ignore_errors=True)  # the SDK has uploaded it by now


def status_lines(address: str | None, job_id: str | None) -> list[str]:
    jobs = client(address)
    if job_id:
        info = jobs.get_job_info(job_id)
        return [f"{info.submission_id}  {info.status}  {info.entrypoint}"
                + (f"\n  {info.message}" if info.message else "")]
    return [f"{j.submission_id}  {j.status}  {j.entrypoint}" for j in jobs.list_jobs() if j.submission_id]


def print_logs(address: str | None, job_id: str, follow: bool) -> None:
    jobs = client(address)
    if not follow:
        print(jobs.get_job_logs(job_id), end="", flush=True)
        return

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())


def wait(address: str | None, job_id: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Block until the job ends (or the timeout passes); returns its last status."""
    jobs = client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(jobs.get_job_status(job_id))
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)
