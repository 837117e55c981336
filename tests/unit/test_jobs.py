"""What `llava-ray submit` sends with a job: no secrets in its env, the token in both headers (the commands against a
real Ray head: tests/end_to_end/test_jobs.py)."""
import pytest


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "LLAVA_RAY_API_KEY", "DB_PASSWORD"])
def test_secret_looking_job_env_is_refused_before_submitting(name):
    """A job's env_vars are part of its runtime_env, which the dashboard shows: secrets go to the nodes instead."""
    from llava_core.submit import job_env

    with pytest.raises(ValueError, match=rf"--env {name}: looks like a secret"):
        job_env([f"{name}=value", "AWS_REGION=us-west-2"])
    assert job_env(["AWS_ENDPOINT_URL=http://minio:9000", "HF_HOME=/cache"]) == {
        "AWS_ENDPOINT_URL": "http://minio:9000", "HF_HOME": "/cache"}


def test_the_token_is_sent_so_it_survives_the_kubernetes_api_proxy(monkeypatch):
    from llava_core.submit import auth_headers

    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0k3n")
    # Ray checks Authorization first, then X-Ray-Authorization (the API server consumes Authorization itself).
    assert auth_headers() == {"Authorization": "Bearer t0k3n", "X-Ray-Authorization": "Bearer t0k3n"}
