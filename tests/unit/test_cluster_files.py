"""The files a platform team deploys with: they parse, carry what KubeRay / the cluster launcher require, and pin the
same versions that pyproject.toml allows (a drifted image is the classic 'works on my laptop' failure)."""
import os
import re

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def load(name: str) -> dict:
    with open(os.path.join(ROOT, "cluster", name)) as f:
        return yaml.safe_load(f)


def project_requirements() -> dict[str, Requirement]:
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def dockerfile_pins() -> dict[str, str]:
    text = open(os.path.join(ROOT, "cluster", "Dockerfile")).read()
    pin = r'"?([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^"\s]*)"?'
    return {name.lower(): version for name, version in re.findall(pin, text)}


def test_dockerfile_pins_satisfy_pyproject_and_the_base_image_matches_ray():
    pins, required = dockerfile_pins(), project_requirements()
    for name in ("ray", "torch", "transformers", "deepspeed", "pyarrow", "pillow", "av", "pyyaml", "peft",
                 "tensorboardx", "matplotlib"):
        assert name in pins, f"cluster/Dockerfile does not pin {name}"
        if name in required:
            assert required[name].specifier.contains(pins[name], prereleases=True), \
                f"cluster/Dockerfile pins {name}=={pins[name]}, outside pyproject's {required[name]}"
    base = re.search(r"^FROM rayproject/ray:([0-9.]+)-", open(os.path.join(ROOT, "cluster", "Dockerfile")).read(), re.M)
    assert base and base.group(1) == pins["ray"]


def cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec  # RayJob, RayService, RayCluster


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml", "rayservice.yaml"])
def test_kuberay_manifests(name):
    manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == {"rayjob.yaml": "RayJob", "raycluster.yaml": "RayCluster",
                                "rayservice.yaml": "RayService"}[name]
    cluster = cluster_spec(manifest)
    assert cluster["rayVersion"] == dockerfile_pins()["ray"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head coordinates; it must not host training workers
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, f"{name}: no GPU worker group"
    for group in gpu_groups:
        pod = group["template"]["spec"]
        shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
        assert any(m["mountPath"] == "/dev/shm" for m in pod["containers"][0]["volumeMounts"])
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    images = {c["image"] for g in [head, *cluster["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, f"{name}: head and workers must run the same image, got {images}"


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml", "rayservice.yaml"])
def test_kuberay_manifests_need_a_token_and_keep_the_dashboard_on_the_pod(name):
    cluster = cluster_spec(load(name))
    assert cluster["authOptions"] == {"mode": "token"}  # KubeRay sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on every pod
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "$(POD_IP)"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    container = head["template"]["spec"]["containers"][0]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    for probe in ("readinessProbe", "livenessProbe"):  # KubeRay's defaults would ask localhost:8265
        assert "http://$POD_IP:8265/api/gcs_healthz" in container[probe]["exec"]["command"][-1]


def credential_source(group: dict) -> dict:
    """Where a pod's S3 credentials come from: its service account (IRSA) and the secrets its containers read."""
    pod = group["template"]["spec"]
    secrets = [(source["secretRef"]["name"], None) for c in pod["containers"] for source in c.get("envFrom", [])
               if "secretRef" in source]
    secrets += [(var["name"], var["valueFrom"]["secretKeyRef"]["name"]) for c in pod["containers"]
                for var in c.get("env", []) if "secretKeyRef" in var.get("valueFrom", {})]
    return {"serviceAccountName": pod.get("serviceAccountName"), "secrets": sorted(secrets)}


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml", "rayservice.yaml"])
def test_the_head_reads_s3_with_the_same_credentials_as_every_worker(name):
    """The driver on the head reads the data manifests and the annotation file: workers alone with keys is not
    enough."""
    cluster = cluster_spec(load(name))
    head = credential_source(cluster["headGroupSpec"])
    assert head["secrets"] or head["serviceAccountName"], f"{name}: the head has no S3 credentials"
    for group in cluster["workerGroupSpecs"]:
        assert credential_source(group) == head, f"{name}: worker group {group['groupName']} differs from the head"


def test_rayjob_runs_the_workflow_from_its_configmap():
    job = load("rayjob.yaml")
    assert job["spec"]["entrypoint"].startswith("python jobs/run_workflow.py /etc/llava/")
    assert os.path.exists(os.path.join(ROOT, "jobs", "run_workflow.py"))
    volumes = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "workflow", "configMap": {"name": "llava-workflow"}} in volumes


def test_rayservice_serve_config_is_valid_and_builds_this_projects_app():
    """Checked with Ray Serve's own config schema; the builder it names is imported and run on its args (building an
    application loads no model: replicas do that once deployed)."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(config)
    app = config["applications"][0]
    # The key is named, never written: every pod sets the variable from a secret, where each replica reads it.
    settings = app["args"]["settings"]
    assert "api_key" not in settings and settings["api_key_env"] == "LLAVA_RAY_API_KEY"
    cluster = cluster_spec(load("rayservice.yaml"))
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = group["template"]["spec"]["containers"][0]["env"]
        assert {"name": "LLAVA_RAY_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llava-api-key",
                                                                            "key": "api-key"}}} in env
    module, attr = app["import_path"].split(":")
    application = getattr(importlib.import_module(module), attr)(app["args"])
    assert type(application).__name__ == "Application"
    assert app["route_prefix"] == "/" and app["deployments"][0]["ray_actor_options"]["num_gpus"] == 1


def test_aws_cluster_launcher_config():
    config = load("aws.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6")) for t in types.values())
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())
    assert any("--shm-size" in option for option in config["docker"]["run_options"])
    # S3 through instance profiles on every node type, the head included; keys are never written into the config.
    assert all("Name" in t["node_config"]["IamInstanceProfile"] or "Arn" in t["node_config"]["IamInstanceProfile"]
               for t in types.values())
    assert not any("AWS_ACCESS_KEY_ID" in option or "AWS_SECRET" in option
                   for option in config["docker"]["run_options"])
    assert any(option.startswith("--env AWS_REGION=") for option in config["docker"]["run_options"])
    # Token auth on every node, the token file shipped to each; the dashboard stays on the head's loopback.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not any("dashboard-host" in command for command in config["head_start_ray_commands"])
    assert config["docker"]["image"] == load("rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"][
        "template"]["spec"]["containers"][0]["image"]


def test_the_image_builds_flash_attention_and_pyproject_needs_a_deepspeed_that_checkpoints_frozen_zero3():
    """`attn_implementation: flash_attention_2` must find flash-attn in the image; DeepSpeed before 0.19.4 raised
    CheckpointError under ZeRO-3 with non-reentrant checkpointing and frozen parameters (the align stage, LoRA)."""
    from packaging.version import Version

    text = open(os.path.join(ROOT, "cluster", "Dockerfile")).read()
    assert "flash-attn" in dockerfile_pins() and re.search(r"pip install [^\n]*flash_attn-\*\.whl", text)
    deepspeed = project_requirements()["deepspeed"].specifier
    assert not deepspeed.contains(Version("0.19.3")) and deepspeed.contains(Version("0.19.4"))
