"""The full-size workflows exactly as shipped (`workflows/llava-v1.5-7b.yaml`, `-7b-lora.yaml`,
`llava-next-vicuna-7b.yaml`, `llava-onevision-qwen2-7b.yaml` and its preference tuning, `-dpo.yaml`), with `--set`
overrides only for where the models and data are, how big the batches and epochs are, how many steps the stages on
the instruct data take and how many CPU workers run (with SDPA where the recipes name flash attention, a GPU kernel),
through every stage including `serve` (with the transformers engine: the workflows' vLLM needs the image's GPU
environment; tests/end_to_end/test_serve_vllm.py runs that path with vLLM's CPU build), on a two-node Ray cluster
whose nodes share no disk:

- the base models are the faithful stand-ins of their hub repos (`llava_core.quickstart.standins`), in a mirror bucket
  under their hub ids (`model.mirror`), so the workflows keep naming `lmsys/vicuna-7b-v1.5` and friends; the DPO
  recipe's starting checkpoint (`llava-hf/llava-onevision-qwen2-7b-ov-hf`) is OneVision assembled from the SigLIP and
  Qwen2 stand-ins and saved in the hub's layout, and prepare reads its processor from there;
- the data is a small dataset in the official layout (one JSON array per stage, images in a folder) in S3, and the run
  directory is in S3 too, all on a real S3 protocol server (moto);
- every node has a private HOME and temp directory, and the driver has its own: nothing a worker or replica opens
  can be a file the driver wrote. The local copies of models and data are deleted before the run.

Afterwards the export loads in plain transformers and gives the endpoint's answer to the serve stage's demo request.

The LoRA recipe's stage 1 is the 7B recipe's (its header says so; the official `finetune_lora.sh` starts from the
pretraining run's `mm_projector.bin`): it runs with `align: null` and `instruct.init_projector` naming the 7B run's
projector in the bucket, as a team that has run both would, instead of training the same projector again (its
64 align rows are still prepared: `--set` cannot delete a dataset, which docs/cluster.md tells a user to do).

`llava-v1.5-13b.yaml` is not run here (~2.7 min of `make test`): it is the 7B recipe with another LLM id and ZeRO-3 in
stage 2, and a Vicuna LLM trained under ZeRO-3 and exported runs in NeXT's recipe; its checks and plan are tested in
tests/end_to_end/test_workflow_checks.py.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.ports import free_port
from tests.ray_cluster import AUTH_ENV, cluster_token_path, local_ray_cluster
from tests.s3_server import environment, s3_server

WORKFLOWS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "workflows"))
BUCKET = "s3://llava-test"
# Each stand-in at its repo's tile geometry: CLIP-L/336 576 features a view, SigLIP so400m/384 729.
HUB_IDS = {"openai/clip-vit-large-patch14-336": 336, "lmsys/vicuna-7b-v1.5": 336,
           "google/siglip-so400m-patch14-384": 384, "Qwen/Qwen2-7B-Instruct": 384}
ONEVISION_CHECKPOINT = "llava-hf/llava-onevision-qwen2-7b-ov-hf"  # the DPO recipe's starting model
STEPS = 3  # of each stage on the 200 instruct rows (13 at batch 16): they plumb, the quickstarts measure learning
PREPARE = ["prepare.num_actors=2", "prepare.rows_per_shard=100"]
SIZES = ["align.global_batch_size=16", "align.micro_batch_size=4", "instruct.global_batch_size=16",
         "instruct.micro_batch_size=4", "instruct.epochs=1", f"instruct.max_steps={STEPS}", *PREPARE]
SCALING = ["scaling.num_workers=2", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
           "scaling.local_dir=''"]  # the system temp directory: no /mnt/scratch here
DATA = [f"datasets.align.path={BUCKET}/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
        f"datasets.align.image_folder={BUCKET}/LLaVA-Pretrain/images",
        f"datasets.instruct.path={BUCKET}/LLaVA-Instruct/llava_v1_5_mix665k.json",
        f"datasets.instruct.image_folder={BUCKET}/LLaVA-Instruct/images"]


def upload(local: str, remote: str) -> None:
    from llava_core import storage

    if os.path.isdir(local):
        storage.copy_dir(local, remote)
    else:
        storage.write_bytes(remote, open(local, "rb").read())


@pytest.fixture(scope="module")
def s3_world(tmp_path_factory):
    """The bucket with the stand-ins under their hub ids and the two stages' data; nothing of it left on disk."""
    from llava_core.quickstart import standins, synthetic

    local = str(tmp_path_factory.mktemp("full_size_sources"))
    with s3_server("llava-test") as env, environment(env):
        # 200 instruct rows: the dataset's two broken rows (a missing and a corrupt image) stay under the
        # workflows' 1% reject limit, as a real dataset's few bad rows must.
        paths = synthetic.generate(local, align_rows=64, instruct_rows=200, eval_questions=0, text_only_rows=2,
                                   seed=3, preference_pairs=48)
        rows = json.load(open(paths["align"])) + json.load(open(paths["instruct"]))
        corpus = [turn["value"] for row in rows for turn in row["conversations"]]
        for hub_id, side in HUB_IDS.items():
            sizes = standins.TinyModelConfig(image_size=side, patch_size=14, vision_layers=2)
            standins.save_standin(hub_id, os.path.join(local, "hub", hub_id), corpus, sizes)
        save_onevision_checkpoint(os.path.join(local, "hub"))
        upload(os.path.join(local, "hub"), f"{BUCKET}/hub")
        upload(paths["preference"], f"{BUCKET}/dpo/llava_ov_dpo.json")
        upload(paths["image_folder"], f"{BUCKET}/dpo/images")
        upload(paths["align"], f"{BUCKET}/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json")
        upload(paths["image_folder"], f"{BUCKET}/LLaVA-Pretrain/images")
        upload(paths["instruct"], f"{BUCKET}/LLaVA-Instruct/llava_v1_5_mix665k.json")
        upload(paths["image_folder"], f"{BUCKET}/LLaVA-Instruct/images")
        shutil.rmtree(local)
        yield env


def save_onevision_checkpoint(hub: str) -> None:
    """The stand-in of the official OneVision checkpoint: the family's model assembled from the SigLIP and Qwen2
    stand-ins, saved as exports are, in the hub's key layout with its processor and chat template (which prepare
    reads from the mirror, as the stage's training does)."""
    import torch

    from llava_core.model.build import assemble
    from llava_core.train.save import save_hf_model

    torch.manual_seed(0)
    model, processor = assemble("llava_onevision", os.path.join(hub, "google/siglip-so400m-patch14-384"),
                                os.path.join(hub, "Qwen/Qwen2-7B-Instruct"), template="chat_template")
    save_hf_model(model, processor, os.path.join(hub, ONEVISION_CHECKPOINT), torch.float32)


@pytest.fixture(scope="module")
def cluster(s3_world, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("full_size_cluster"))
    with local_ray_cluster(os.path.join(root, "ray"), nodes=2, cpus_per_node=1, env=s3_world,
                           private_disks=True) as (gcs, dashboard):
        yield gcs, root, dashboard


# The OneVision recipe's stage 1.5 mixture: one source here, the instruct data (its five sources need five files).
EXTRA = {"llava-onevision-qwen2-7b": [
    f"datasets.knowledge.sources=[{{path: {BUCKET}/LLaVA-Instruct/llava_v1_5_mix665k.json, "
    f"image_folder: {BUCKET}/LLaVA-Instruct/images}}]",
    "knowledge.global_batch_size=16", "knowledge.micro_batch_size=4", f"knowledge.max_steps={STEPS}"]}
# The DPO recipe has its own data (the pairs, as written) and batch: only these sizes change.
OWN_DATA = {"llava-onevision-qwen2-7b-dpo": [f"datasets.preference.path={BUCKET}/dpo/llava_ov_dpo.json",
                                             f"datasets.preference.image_folder={BUCKET}/dpo/images",
                                             "preference.global_batch_size=8", "preference.micro_batch_size=1",
                                             *PREPARE]}


# Recipes whose stage 1 is another's: name -> that recipe, whose run's projector this one starts from.
STAGE_ONE_OF = {"llava-v1.5-7b-lora": "llava-v1.5-7b"}


def stage_one_projector(name: str) -> str:
    return f"{BUCKET}/runs/{STAGE_ONE_OF[name]}/align/mm_projector.bin"


def stage_one_overrides(name: str) -> list[str]:
    return ["align=null", f"instruct.init_projector={stage_one_projector(name)}"] if name in STAGE_ONE_OF else []


@pytest.fixture(scope="module")
def runs(cluster, s3_world):
    """Each workflow's run, once: name -> (the finished CLI process, the nodes that hosted the training workers this
    run started); a recipe whose stage 1 is another's runs after that one."""
    gcs, root, dashboard = cluster
    done = {}

    def run(name: str) -> tuple[subprocess.CompletedProcess, set]:
        if name in STAGE_ONE_OF:
            first, _ = run(STAGE_ONE_OF[name])
            assert first.returncode == 0, f"{STAGE_ONE_OF[name]}, whose projector {name} starts from, failed"
        if name not in done:
            before = training_workers(dashboard)
            process = run_workflow(name, gcs, root, s3_world)
            done[name] = process, {node for actor, node in training_workers(dashboard).items() if actor not in before}
        return done[name]
    return run


def run_workflow(name: str, gcs: str, root: str, env: dict) -> subprocess.CompletedProcess:
    driver_home = os.path.join(root, f"driver-{name}", "home")
    os.makedirs(driver_home)
    overrides = [f"storage={BUCKET}/runs", f"ray_address={gcs}", f"model.mirror={BUCKET}/hub",
                 f"serve.port={free_port()}", "serve.host=127.0.0.1", "serve.engine=transformers",
                 *OWN_DATA.get(name, [*DATA, *SIZES]), *SCALING, *cpu_attention(name), *EXTRA.get(name, []),
                 *stage_one_overrides(name)]
    driver_env = {**os.environ, **AUTH_ENV, **env, "HOME": driver_home, "RAY_AUTH_TOKEN_PATH": cluster_token_path(),
                  "TMPDIR": os.path.dirname(driver_home)}
    return subprocess.run(
        [sys.executable, "-m", "llava_core.cli", "run", os.path.join(WORKFLOWS, f"{name}.yaml"), "--exit-after-serve",
         *[arg for o in overrides for arg in ("--set", o)]],
        cwd=os.path.dirname(driver_home), env=driver_env, capture_output=True, text=True, timeout=1500)


def cpu_attention(name: str) -> list[str]:
    """SDPA for each stage the recipe trains with flash attention, whose kernel runs on GPUs only."""
    from llava_core.config import read_yaml

    recipe = read_yaml(open(os.path.join(WORKFLOWS, f"{name}.yaml")))
    return [f"{stage}.attn_implementation=sdpa" for stage, section in recipe.items()
            if isinstance(section, dict) and section.get("attn_implementation") == "flash_attention_2"]


def family_of(workflow_name: str) -> str:
    return {"llava-next": "llava_next", "llava-onevision": "llava_onevision"}.get(
        "-".join(workflow_name.split("-")[:2]), "llava")


def training_workers(dashboard: str) -> dict[str, str]:
    """Every Ray Train worker the cluster has hosted (dead ones included): actor id -> node id, from the dashboard's
    state API."""
    import requests

    from llava_core.submit import auth_headers

    reply = requests.get(f"{dashboard}/api/v0/actors", headers=auth_headers(), timeout=30, params={
        "filter_keys": "class_name", "filter_predicates": "=", "filter_values": "RayTrainWorker", "detail": "1",
        "limit": "1000"})
    reply.raise_for_status()
    return {actor["actor_id"]: actor["node_id"] for actor in reply.json()["data"]["result"]["result"]}


def answer_in_plain_transformers(export_dir: str, question: str, image_bytes: bytes, max_new_tokens: int) -> str:
    """The export's answer through transformers alone, as its family's class. OneVision's processor needs
    torchvision for its video half, which a CPU-only install lacks: there the export's processor config (saved as
    LlavaOnevisionProcessor) loads as the project's image-only subclass; everything else is transformers'."""
    import io

    import torch
    from PIL import Image
    from transformers import (
        AutoProcessor,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
    )

    config = json.load(open(os.path.join(export_dir, "config.json")))
    model_class = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
                   "llava_onevision": LlavaOnevisionForConditionalGeneration}[config["model_type"]]
    model = model_class.from_pretrained(export_dir).eval()
    if config["model_type"] == "llava_onevision":
        from llava_core.model.processors import ImageOnlyOnevisionProcessor

        processor = ImageOnlyOnevisionProcessor.from_pretrained(export_dir)
    else:
        processor = AutoProcessor.from_pretrained(export_dir)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")  # padded or tiled by the export's own processor
    messages = [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image", "image": image}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", ["llava-v1.5-7b", "llava-v1.5-7b-lora", "llava-next-vicuna-7b",
                                  "llava-onevision-qwen2-7b", "llava-onevision-qwen2-7b-dpo"])
def test_full_size_workflow_runs_every_stage_on_two_nodes_with_private_disks(name, cluster, s3_world, runs, tmp_path):
    from llava_core import storage

    root = cluster[1]
    run, worker_nodes = runs(name)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    if name in STAGE_ONE_OF:  # stage 2 started from the other run's projector, read from the bucket by the workers
        assert f"loaded the official projector {stage_one_projector(name)}" in run.stdout + run.stderr
    assert len(worker_nodes) == 2  # this run's training workers, one per node (not an earlier run's)
    driver_home = os.path.join(root, f"driver-{name}", "home")
    assert not os.path.exists(os.path.join(driver_home, ".cache", "llava-ray")), "the driver mirrored a model"
    for node in ("head", "worker1"):  # each node mirrored the models it used into its own cache
        assert os.listdir(os.path.join(root, "ray", node, "home", ".cache", "llava-ray"))

    with environment(s3_world):
        run_dir = f"{BUCKET}/runs/{name}"
        summary = storage.read_json(storage.join(run_dir, "summary.json"))
        print(name, {stage: summary[stage]["seconds"] for stage in summary if isinstance(summary[stage], dict)})
        if name in OWN_DATA:
            check_dpo_run(run_dir, summary)
        else:
            check_training_stages(name, run_dir, summary)
        export = str(tmp_path / "export")
        storage.copy_dir(storage.join(run_dir, "export"), export)
        demo = storage.read_json(storage.join(run_dir, "serve", "demo.json"))
        asked_image = re.search(r"\((.+)\)$", demo["image"]).group(1)  # "<file> row N (<image name>)"
        folder = f"{BUCKET}/dpo/images" if name in OWN_DATA else f"{BUCKET}/LLaVA-Instruct/images"
        image = storage.read_bytes(f"{folder}/{asked_image}")
    config = json.load(open(os.path.join(export, "config.json")))
    assert config["dtype"] == "float32"  # trained on CPU in fp32, exported as trained (bf16 on a GPU run)
    assert demo["answer"] == answer_in_plain_transformers(export, demo["question"], image, demo["max_tokens"])


def check_dpo_run(run_dir: str, summary: dict) -> None:
    """prepare -> preference (from the official checkpoint, everything trained) -> export -> evaluate -> serve; the
    first step's DPO loss is log 2 (the model starts as its own reference), and the pairs all prepared."""
    import math

    from llava_core import storage

    stages = ["prepare", "preference", "export", "evaluate", "serve"]
    assert [summary[s]["status"] for s in stages] == ["done"] * len(stages)
    assert "align" not in summary and "instruct" not in summary
    manifest = storage.read_json(storage.join(run_dir, "prepare", "manifest.json"))
    assert manifest["datasets"]["preference"]["rows_written"] == 48
    assert summary["preference"]["steps"] == 48 // 8 and summary["preference"]["first_loss"] == \
        pytest.approx(math.log(2), abs=1e-4)
    assert set(storage.read_json(storage.join(run_dir, "preference", "trainable.json"))["trained"]) == \
        {"vision", "projector", "llm"}
    # evaluate scores the starting checkpoint beside the export (the recipe names no eval sets: nothing to score)
    assert summary["evaluate"]["instruct"] == {"sets": {}} and summary["evaluate"]["sets"] == {}


def check_training_stages(name: str, run_dir: str, summary: dict) -> None:
    """align -> [knowledge] -> instruct, each handing on what the next needs; the rows and image tokens counted."""
    from llava_core import storage

    stage_one = [] if name in STAGE_ONE_OF else ["align"]  # or the other recipe's (the module's docstring)
    stages = ["prepare", *stage_one, *(["knowledge"] if name in EXTRA else []), "instruct", "export", "evaluate",
              "serve"]
    assert [summary[s]["status"] for s in stages] == ["done"] * len(stages)
    assert ("align" in summary) == bool(stage_one)
    capped = [s for s in ("knowledge", "instruct") if s in stages]  # the stages on the instruct data
    assert [summary[s]["steps"] for s in capped] == [STEPS] * len(capped)
    manifest = storage.read_json(storage.join(run_dir, "prepare", "manifest.json"))
    assert manifest["datasets"]["instruct"]["rows_rejected"] == 2
    # Every image token is counted: CLIP-L/336's 576 a view; AnyRes's base view and the unpadded tile of a
    # 96 x 72 image (NeXT: a 1x2 grid, 576 + 24 x 32 + 24 newlines; OneVision: 1x1, 729 + 21 x 27 + 21).
    assert manifest["datasets"]["align"]["max_length"] > {"llava": 576, "llava_next": 2 * 576,
                                                           "llava_onevision": 729 + 729 // 2}[family_of(name)]
    if name in EXTRA:  # stage 1.5 trained the whole model and handed it on whole
        assert set(storage.read_json(storage.join(run_dir, "knowledge", "trainable.json"))["trained"]) == \
            {"vision", "projector", "llm"}
    # Align hands on the projector alone (the official mm_projector.bin), not a model copy.
    align_run = f"{BUCKET}/runs/{STAGE_ONE_OF[name]}" if name in STAGE_ONE_OF else run_dir
    align_files = {name for name, _, _ in storage.listing(storage.join(align_run, "align"))}
    assert "mm_projector.bin" in align_files and not any(f.startswith("model/") for f in align_files)
    assert ("adapter/adapter_config.json" in set(summary["export"]["files"]) or
            "adapter" in summary["export"]) == name.endswith("lora")
