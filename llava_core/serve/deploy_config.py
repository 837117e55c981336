"""Ray Serve config files for an export: what `llava-ray serve --config-out F` writes.

The file is a Ray Serve config (`serve deploy F`, or the `serveConfigV2` of a KubeRay RayService). With
`serve.engine: transformers` its application is this package's endpoint, built by `llava_core.serve.app:build_app`
from the settings in `args`; the `deployments` entry repeats the replica options so operators can read and change
them there. With `serve.engine: vllm` the application is Ray's own `ray.serve.llm:build_openai_app` with one
`LLMConfig` that points vLLM at the export: nothing of vLLM is imported here, the config is plain data.
"""
from __future__ import annotations

import dataclasses
import os

import yaml

from llava_core import storage
from llava_core.config import ServeSettings

BUILDER = "llava_core.serve.app:build_app"
VLLM_BUILDER = "ray.serve.llm:build_openai_app"
APP_NAME = "llava"
DEPLOYMENT_NAME = "LlavaServer"


def resolve_model_dir(path: str) -> str:
    """An export directory as given, or the `export/` folder of a run directory."""
    if not storage.is_remote(path):
        path = os.path.abspath(path)
    export = storage.join(path, "export")
    if storage.exists(storage.join(export, "config.json")):
        return export
    if not storage.exists(storage.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is neither an exported model (no config.json) nor a run directory with an "
                                "export/ folder; run the workflow's export stage first")
    return path


def default_model_name(model_dir: str) -> str:
    """The run's name for `<run>/export`, else the folder's name."""
    parts = model_dir.rstrip("/").split("/")
    return parts[-2] if parts[-1] == "export" and len(parts) > 1 else parts[-1]


def replica_options(settings: ServeSettings, gpus: float | None) -> dict:
    """Ray Serve deployment options from the workflow's serve settings; `gpus=None` leaves resources to the code."""
    options: dict = {
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "backpressure_config": {"status_code": settings.overload_status, "retry_after_s": 1},
        "health_check_period_s": settings.health_check_period_s,
    }
    if gpus is not None:
        options["ray_actor_options"] = {"num_cpus": settings.cpus_per_replica, "num_gpus": gpus}
    if settings.autoscaling is None:
        options["num_replicas"] = settings.num_replicas
    else:
        options["autoscaling_config"] = autoscaling_config(settings)
    return options


def autoscaling_config(settings: ServeSettings) -> dict:
    a = settings.autoscaling
    return {
        "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
        "initial_replicas": a.initial_replicas if a.initial_replicas is not None else a.min_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
    }


def export_family(model_dir: str) -> str:
    """The LLaVA family of an export, from its config.json's model_type (one small read)."""
    return storage.read_json(storage.join(model_dir, "config.json"))["model_type"]


def serve_config(model_dir: str, settings: ServeSettings, model_name: str) -> dict:
    app = vllm_application(model_dir, settings, model_name, export_family(model_dir)) if settings.engine == "vllm" \
        else transformers_application(model_dir, settings, model_name)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port},
        "applications": [app],
    }


def transformers_application(model_dir: str, settings: ServeSettings, model_name: str) -> dict:
    # With gpus_per_replica unset the builder decides on the cluster (one GPU if it has any); ray_actor_options
    # written here would replace the builder's, so they are only written when the workflow fixes the GPUs.
    deployment = {"name": DEPLOYMENT_NAME, **replica_options(settings, settings.gpus_per_replica)}
    return {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": BUILDER,
        "args": {"model_dir": model_dir, "model_name": model_name, "settings": dataclasses.asdict(settings)},
        "deployments": [deployment],
    }


def vllm_application(model_dir: str, settings: ServeSettings, model_name: str, family: str = "llava",
                     env: dict | None = None) -> dict:
    """Ray's OpenAI app for vLLM, built by its import path where it runs: Serve's controller imports
    `ray.serve.llm` (and with it vLLM) in the application's runtime environment, so the driver needs neither. The
    ingress only routes (no CPU of its own, as Ray's request router), or with `serve.vllm.direct_streaming` the LLM
    server is the ingress; the replicas run in `serve.vllm.python`'s environment when it is set, with `env` added to
    theirs."""
    args = {"llm_configs": [vllm_llm_config(model_dir, settings, model_name, family)]}
    env = dict(env or {})
    if settings.vllm.direct_streaming:  # the LLM server is the ingress; Ray refuses ingress options then
        env["RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"] = "1"
    else:
        args["ingress_deployment_config"] = {"ray_actor_options": {"num_cpus": 0}}
    app = {"name": APP_NAME, "route_prefix": "/", "import_path": VLLM_BUILDER, "args": args}
    runtime_env = vllm_runtime_env(settings, env)
    if runtime_env:
        app["runtime_env"] = runtime_env
    return app


def vllm_runtime_env(settings: ServeSettings, env: dict) -> dict:
    """Where and with what environment the vLLM app is built and its replicas run: `serve.vllm.python` as Ray's
    `py_executable`, and `serve.vllm.env_vars` on top of `env`."""
    env = {**env, **settings.vllm.env_vars}
    runtime_env = {"env_vars": env} if env else {}
    if settings.vllm.python:
        runtime_env["py_executable"] = settings.vllm.python
    return runtime_env


def media_limits(settings: ServeSettings, family: str) -> dict:
    """vLLM's `limit_mm_per_prompt`: what a prompt may carry, which is also what vLLM reserves memory for when it
    profiles the largest multimodal prompt at start-up. OneVision models take video too (`serve.max_videos`); the
    other families none."""
    limits = {"image": settings.max_images}
    if family == "llava_onevision":
        limits["video"] = settings.max_videos
    return limits


def vllm_llm_config(model_dir: str, settings: ServeSettings, model_name: str, family: str = "llava") -> dict:
    """A `ray.serve.llm.LLMConfig` (as data) serving the export with vLLM. The export is a standard HF checkpoint of
    its family, which vLLM loads by its config's architecture (`LlavaForConditionalGeneration`,
    `LlavaNextForConditionalGeneration`, `LlavaOnevisionForConditionalGeneration`) with its processor and chat
    template (a OneVision export's processor config names LlavaOnevisionProcessor and its video processor)."""
    engine_kwargs = {"limit_mm_per_prompt": media_limits(settings, family), **settings.vllm.engine_kwargs}
    deployment = replica_options(settings, gpus=None)  # vLLM's placement comes from the engine's parallelism
    deployment.pop("backpressure_config")  # not among the options LLMConfig passes on
    # A model in S3 is a mirror that ray.serve.llm downloads on each node; a local path must exist on every node.
    source = {"bucket_uri": model_dir} if storage.is_remote(model_dir) else model_dir
    config = {
        "model_loading_config": {"model_id": model_name, "model_source": source},
        "engine_kwargs": engine_kwargs,
        "deployment_config": deployment,
    }
    if settings.vllm.accelerator_type:
        config["accelerator_type"] = settings.vllm.accelerator_type
    if settings.gpus_per_replica == 0:  # vLLM's CPU build: the engine's one bundle holds CPUs, not a GPU
        config["placement_group_config"] = {"bundles": [{"CPU": settings.cpus_per_replica}]}
    return config


def write_serve_config(path: str, config: dict) -> None:
    header = (
        "# Ray Serve config written by `llava-ray serve --config-out`.\n"
        "# Deploy:   serve deploy THIS_FILE  (to the cluster at RAY_DASHBOARD_ADDRESS, default localhost:8265)\n"
        "# KubeRay:  paste this document under `spec.serveConfigV2: |` of a RayService.\n"
        "# The model directory must be readable from every node (s3:// or a shared file system).\n"
    )
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump(config, f, sort_keys=False)
