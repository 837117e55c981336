"""`llava-ray serve --config-out`: the Ray Serve configs it writes, checked against Ray's own schemas.

Nothing is deployed: the builder is called to prove the import path works and applies the options, and the vLLM
config is validated with `ray.serve.llm`'s `LLMConfig` model (vLLM itself is not installed here and needs a GPU).
"""
from __future__ import annotations

import importlib
import json
import os

import pytest
import yaml

from llava_core.cli import main
from llava_core.config import WorkflowError, serve_settings_from_dict


@pytest.fixture()
def run_dir(tmp_path):
    """A run directory whose export/ holds a model config: enough to write a config, which never loads weights."""
    export = tmp_path / "shapes-run" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text(json.dumps({"model_type": "llava"}))
    return str(tmp_path / "shapes-run")


@pytest.fixture()
def workflow_file(tmp_path):
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump({"name": "shapes", "serve": {
        "max_ongoing_requests": 12, "max_queued_requests": 40, "overload_status": 503, "cpus_per_replica": 2,
        "gpus_per_replica": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 6},
        "api_key_env": "SHAPES_API_KEY", "image_url_hosts": ["images.example.com"]}}))
    return str(path)


def write_config(tmp_path, *args) -> dict:
    out = str(tmp_path / "serve.yaml")
    assert main(["serve", *args, "--config-out", out]) == 0
    with open(out) as f:
        return yaml.safe_load(f)


def test_config_for_a_run_dir_deploys_the_export_with_the_workflow_settings(tmp_path, run_dir, workflow_file,
                                                                          monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.setenv("SHAPES_API_KEY", "k3y-that-must-not-leak")
    doc = write_config(tmp_path, run_dir, "--workflow", workflow_file, "--set", "autoscaling.max_replicas=4",
                       "--port", "9100")

    ServeDeploySchema.model_validate(doc)  # what `serve deploy` and KubeRay's serveConfigV2 accept
    assert doc["http_options"] == {"host": "0.0.0.0", "port": 9100}
    [app] = doc["applications"]
    assert app["import_path"] == "llava_core.serve.app:build_app" and app["route_prefix"] == "/"
    assert app["args"]["model_dir"] == os.path.join(run_dir, "export")
    assert app["args"]["model_name"] == "shapes-run"
    settings = app["args"]["settings"]
    assert settings["api_key_env"] == "SHAPES_API_KEY" and settings["image_url_hosts"] == ["images.example.com"]
    assert "k3y-that-must-not-leak" not in (tmp_path / "serve.yaml").read_text()  # the name travels, not the key
    [deployment] = app["deployments"]
    assert deployment == {
        "name": "LlavaServer", "max_ongoing_requests": 12, "max_queued_requests": 40,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1}, "health_check_period_s": 5.0,
        "ray_actor_options": {"num_cpus": 2.0, "num_gpus": 0.5},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                               "target_ongoing_requests": 6.0, "upscale_delay_s": 30.0, "downscale_delay_s": 600.0},
    }

    module, name = app["import_path"].split(":")
    application = getattr(importlib.import_module(module), name)(app["args"])
    bound = application._bound_deployment
    assert bound.name == "LlavaServer"
    assert bound.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert bound.max_ongoing_requests == 12
    assert bound._deployment_config.max_queued_requests == 40
    assert bound._deployment_config.autoscaling_config.max_replicas == 4
    assert bound.init_args[0] == os.path.join(run_dir, "export") and bound.init_args[2] == "shapes-run"
    assert bound.init_args[1].api_key_env == "SHAPES_API_KEY"


@pytest.mark.parametrize("section", ["serve", "evaluate.endpoint"])
def test_a_key_written_in_the_workflow_is_refused_with_where_to_put_it(section, tmp_path):
    from llava_core.config import WorkflowError, load_workflow

    data = {"serve": {"api_key": "s3cr3t"}} if section == "serve" else \
        {"evaluate": {"endpoint": {"url": "http://x", "model": "m", "api_key": "s3cr3t"}}}
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump({"name": "shapes", **data}))
    with pytest.raises(WorkflowError, match=rf"{section}\.api_key: a key written in the workflow .* api_key_env"):
        load_workflow(str(path))


def test_the_cli_takes_no_key_on_its_command_line(tmp_path, run_dir, capsys):
    with pytest.raises(SystemExit):
        main(["serve", run_dir, "--api-key", "s3cr3t", "--config-out", str(tmp_path / "x.yaml")])
    assert "name that: --api-key-env VAR or --api-key-file FILE" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_the_endpoint_says_how_it_checks_callers(monkeypatch):
    """The key is named in the serve settings only: a key variable set on the server alone is reported unread."""
    from llava_core.serve.client import auth_line

    monkeypatch.delenv("LLAVA_RAY_API_KEY", raising=False)
    assert auth_line(serve_settings_from_dict({"api_key_env": "SHAPES_KEY"})) == \
        "auth      every request needs `Authorization: Bearer $SHAPES_KEY`"
    assert auth_line(serve_settings_from_dict({"api_key_file": "/run/key"})).endswith("Bearer $(cat /run/key)`")
    assert auth_line(serve_settings_from_dict({})).startswith("auth      none: anyone who reaches the endpoint")
    assert "warning" not in auth_line(serve_settings_from_dict({}))
    monkeypatch.setenv("LLAVA_RAY_API_KEY", "s3cr3t")
    unread = auth_line(serve_settings_from_dict({}))
    assert "warning: LLAVA_RAY_API_KEY is set here, but the endpoint reads a key only from where serve.api_key_env " \
           "names it" in unread and "s3cr3t" not in unread


def test_config_with_fixed_replicas_and_automatic_gpus(tmp_path, run_dir):
    doc = write_config(tmp_path, os.path.join(run_dir, "export"), "--set", "num_replicas=3", "--model-name", "m")
    [deployment] = doc["applications"][0]["deployments"]
    assert deployment["num_replicas"] == 3 and "autoscaling_config" not in deployment
    # Left to the builder, which gives a replica a GPU on clusters that have one; written options would replace it.
    assert "ray_actor_options" not in deployment
    assert doc["applications"][0]["args"]["model_name"] == "m"


def test_vllm_engine_config_is_a_ray_serve_llm_app(tmp_path, run_dir, workflow_file):
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig  # importable without vLLM
    from ray.serve.schema import ServeDeploySchema

    doc = write_config(tmp_path, run_dir, "--workflow", workflow_file, "--set", "engine=vllm",
                       "--set", "api_key_env=null",  # Ray's LLM app checks no key (refused below)
                       "--set", "vllm.engine_kwargs={max_model_len: 4096, tensor_parallel_size: 1}",
                       "--set", "vllm.accelerator_type=L4", "--set", "vllm.python=/opt/vllm/bin/python",
                       "--set", "vllm.env_vars={VLLM_CPU_KVCACHE_SPACE: '4'}", "--model-name", "llava-shapes")

    ServeDeploySchema.model_validate(doc)
    [app] = doc["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    # Built where it runs: Serve's controller imports vLLM in the app's environment, never the driver.
    assert app["runtime_env"] == {"py_executable": "/opt/vllm/bin/python",
                                  "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "4"}}
    assert app["args"]["ingress_deployment_config"] == {"ray_actor_options": {"num_cpus": 0}}
    [raw] = app["args"]["llm_configs"]
    config = LLMConfig.model_validate(raw)
    assert config.model_loading_config.model_id == "llava-shapes"
    assert config.model_loading_config.model_source == os.path.join(run_dir, "export")
    assert config.engine_kwargs == {"limit_mm_per_prompt": {"image": 4}, "max_model_len": 4096,
                                    "tensor_parallel_size": 1}
    assert config.accelerator_type == "L4"
    assert config.deployment_config == {
        "max_ongoing_requests": 12, "max_queued_requests": 40, "health_check_period_s": 5.0,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
                               "target_ongoing_requests": 6.0, "upscale_delay_s": 30.0, "downscale_delay_s": 600.0},
    }


def test_vllm_direct_streaming_makes_the_llm_server_the_ingress():
    from llava_core.serve.deploy_config import vllm_application

    settings = serve_settings_from_dict({"engine": "vllm", "vllm": {"direct_streaming": True}})
    app = vllm_application("/models/export", settings, "m")
    assert app["runtime_env"]["env_vars"] == {"RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"}
    assert "ingress_deployment_config" not in app["args"]  # Ray refuses ingress options with direct streaming


def test_an_api_key_with_the_vllm_engine_is_refused(tmp_path, run_dir, workflow_file):
    """Ray's LLM app checks no key: a workflow asking for one must not serve without it."""
    from llava_core.config import WorkflowError, load_workflow

    with pytest.raises(WorkflowError, match=r"serve\.engine: `vllm` serves through Ray's own OpenAI app, which "
                                            r"checks no API key"):
        load_workflow(workflow_file, ["serve.engine=vllm"])


def test_vllm_config_mirrors_a_model_in_s3():
    from llava_core.serve.deploy_config import vllm_llm_config

    config = vllm_llm_config("s3://bucket/runs/shapes/export", serve_settings_from_dict({"engine": "vllm"}), "m")
    assert config["model_loading_config"]["model_source"] == {"bucket_uri": "s3://bucket/runs/shapes/export"}


def test_vllm_config_of_each_family_names_the_media_it_takes(tmp_path):
    """The family comes from the export's config.json; OneVision's vLLM config takes the endpoint's videos, and every
    family gets the image limit the workflow sets."""
    from llava_core.serve.deploy_config import serve_config

    settings = serve_settings_from_dict({"engine": "vllm", "max_images": 3, "max_videos": 2})
    limits = {}
    for family in ("llava", "llava_next", "llava_onevision"):
        export = tmp_path / family
        export.mkdir()
        (export / "config.json").write_text(json.dumps({"model_type": family}))
        app = serve_config(str(export), settings, "m")["applications"][0]
        limits[family] = app["args"]["llm_configs"][0]["engine_kwargs"]["limit_mm_per_prompt"]
    assert limits == {"llava": {"image": 3}, "llava_next": {"image": 3}, "llava_onevision": {"image": 3, "video": 2}}


def test_serve_refuses_a_folder_without_a_model(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--config-out", str(tmp_path / "x.yaml")]) == 2
    assert "neither an exported model" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("data, fragment", [
    ({"engine": "tgi"}, "serve.engine"),
    ({"overload_status": 500}, "overload_status"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 1}}, "min_replicas <= max_replicas"),
    ({"image_url_hosts": ["http://x.com/"]}, "image_url_hosts"),
    ({"gpus_per_replica": "half"}, "gpus_per_replica"),
    ({"replicas": 2}, "did you mean"),
])
def test_bad_serve_settings_name_the_key(data, fragment):
    with pytest.raises(WorkflowError, match=fragment):
        serve_settings_from_dict(data)
