"""Secrets (the endpoint's API key) are named in a workflow, never written in it: the workflow says which environment
variable or file holds one, and each process that needs it reads it there itself.

A value in the workflow would be copied wherever settings travel: the Serve config `--config-out` writes, the
RayService object, the dashboard, logs. A Kubernetes secret reaches a pod as an environment variable
(`env.valueFrom.secretKeyRef`) or as a mounted file; both are read here.
"""
from __future__ import annotations

import os
from typing import Optional

# The variable the shipped cluster files (cluster/rayservice.yaml) give the endpoint's key. Nothing reads it unless
# `serve.api_key_env` names it; a server started without that while it is set says so (`serve.client.auth_line`).
ENDPOINT_KEY_VARIABLE = "LLAVA_RAY_API_KEY"


class SecretMissing(RuntimeError):
    """The workflow names a secret this process cannot find: refuse to go on rather than run without it."""


def read_secret(env_name: Optional[str], file_path: Optional[str], what: str) -> Optional[str]:
    """The secret from `file_path` if set, else from the variable `env_name` if set; None when neither is named."""
    if file_path:
        try:
            with open(file_path) as f:
                value = f.read().strip()
        except OSError as error:
            raise SecretMissing(f"{what}: cannot read {file_path}: {error.strerror}") from None
        if not value:
            raise SecretMissing(f"{what}: {file_path} is empty")
        return value
    if env_name:
        value = os.environ.get(env_name, "").strip()
        if not value:
            raise SecretMissing(f"{what}: the environment variable {env_name} is not set in this process "
                                f"(on Kubernetes, set it on every pod from a secret; locally, export it before "
                                f"Ray starts)")
        return value
    return None


def shell_reference(env_name: Optional[str], file_path: Optional[str]) -> Optional[str]:
    """How a shell command names the secret without showing it: `$VAR` or `$(cat FILE)`."""
    if file_path:
        return f"$(cat {file_path})"
    return f"${env_name}" if env_name else None
