"""Workflow problems found before any worker starts: each with its YAML path and a hint, non-zero exit; and the plan
(the full-size recipes validated and planned: tests/end_to_end/test_workflow_checks.py)."""
import json
import os

import pytest

from llava_core import preflight
from llava_core.config import WorkflowError, load_workflow, readable_sections
from tests.workflow_checks_helpers import OFFLINE_AWS, ROOT, validate


def cluster_workflow(tmp_path, *overrides):
    """A full-size workflow whose data paths are local files, so path checks have something to find or miss."""
    data = tmp_path / "data.json"
    data.write_text("[]")
    return load_workflow(os.path.join(ROOT, "workflows", "llava-v1.5-7b.yaml"), [
        f"datasets.align.path={data}", f"datasets.align.image_folder={tmp_path}",
        f"datasets.instruct.path={data}", f"datasets.instruct.image_folder={tmp_path}", *overrides])


def test_missing_local_paths_are_all_reported_with_their_yaml_path(tmp_path):
    workflow = cluster_workflow(tmp_path, f"datasets.instruct.image_folder={tmp_path / 'nope'}",
                                "model.llm=./models/my-llm")
    with pytest.raises(WorkflowError) as error:
        preflight.check(workflow)
    message = str(error.value)
    assert message.startswith("2 problem(s):")
    assert f"datasets.instruct.image_folder: {tmp_path / 'nope'} does not exist" in message
    assert "model.llm:" in message and "my-llm does not exist" in message
    assert "datasets.align.path" not in message  # it exists
    preflight.check(cluster_workflow(tmp_path))  # hub ids and s3:// paths are not looked up by default


def quickstart_copy(tmp_path, monkeypatch, old: str = "", new: str = "") -> str:
    """The quickstart in an empty working directory: its synthetic data and models do not exist yet."""
    monkeypatch.chdir(tmp_path)
    with open(os.path.join(ROOT, "workflows", "quickstart.yaml")) as f:
        text = f.read()
    assert old in text
    (tmp_path / "quickstart.yaml").write_text(text.replace(old, new, 1))
    return str(tmp_path / "quickstart.yaml")


def test_a_mistyped_path_in_a_quickstart_copy_is_reported(tmp_path, monkeypatch):
    path = quickstart_copy(tmp_path, monkeypatch, "path: data/quickstart/instruct.json",
                           "path: data/quickstart/instruc.json")
    with pytest.raises(WorkflowError) as error:
        preflight.check_file(path)
    assert error.value.problems == [
        f"datasets.instruct.path: {tmp_path}/data/quickstart/instruc.json does not exist; no such file or directory "
        f"(relative paths are resolved against {tmp_path})"]
    # The files its first run creates are fine while missing: the dataset under synthetic.root, the models.
    workflow = preflight.check_file(quickstart_copy(tmp_path, monkeypatch))
    assert not os.path.exists(workflow.datasets["instruct"].path) and not os.path.exists(workflow.model.llm)


def test_key_errors_and_path_errors_are_reported_at_once(tmp_path, monkeypatch):
    path = quickstart_copy(tmp_path, monkeypatch, "image_folder: data/quickstart/images\n    template: plain",
                           "image_folder: data/quickstart/imgs\n    template: plain")
    with pytest.raises(WorkflowError) as error:  # the synthetic section has a bad key: its root is still read
        preflight.check_file(path, ["synthetic.seeds=1", "instruct.lrr=1", "evaluate.answers=answers.jsonl"])
    problems = error.value.problems
    assert problems[:2] == ["synthetic.seeds: unknown key (did you mean 'seed'?)",
                            "instruct.lrr: unknown key (did you mean 'lr'?)"]
    assert [p.split(" does not exist")[0] for p in problems[2:]] == [
        "datasets.align.image_folder: data/quickstart/imgs", "evaluate.answers: answers.jsonl"]
    result = validate(path, "--set", "instruct.lrr=1")  # the CLI prints them all and exits non-zero
    assert result.returncode == 2 and "2 problem(s):" in result.stderr, result.stderr
    assert "instruct.lrr: unknown key" in result.stderr and "datasets.align.image_folder:" in result.stderr


def test_a_section_with_a_schema_error_has_its_paths_unchecked_the_others_checked(tmp_path):
    data = {"datasets": {"bad": {"path": str(tmp_path / "a.json"), "templat": "plain"},
                         "good": {"path": str(tmp_path / "b.json")}},
            "model": {"llm": str(tmp_path / "llm")}, "evaluate": {"questions": 3}}
    readable = readable_sections(data)
    assert list(readable.datasets) == ["good"] and readable.model.llm == str(tmp_path / "llm")
    assert readable.evaluate.questions == ""
    assert [p.split(":")[0] for p in preflight.path_problems(readable)] == ["datasets.good.path", "model.llm"]


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "workflows")) if n.endswith(".yaml")))
def test_the_shipped_workflows_validate_with_no_data_created_yet(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quickstarts' relative data paths point at nothing here
    preflight.check_file(os.path.join(ROOT, "workflows", name))


def test_a_worker_bigger_than_any_node_is_refused(tmp_path):
    workflow = cluster_workflow(tmp_path, "scaling.gpus_per_worker=16")
    with pytest.raises(WorkflowError, match="scaling.gpus_per_worker: 16 GPUs for one worker"):
        preflight.check(workflow)
    nodes = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 4.0}}]
    problems = preflight.resource_problems(cluster_workflow(tmp_path, "scaling.gpus_per_worker=6"), nodes)
    assert problems and "the largest node of this cluster has 4" in problems[0]
    assert preflight.resource_problems(cluster_workflow(tmp_path), nodes) == []


@pytest.mark.parametrize("override, fragment", [
    ("instruct.lrr=1", "instruct.lrr: unknown key (did you mean 'lr'?)"),
    ("scaling.num_workers=three", "scaling.num_workers: expected int, got 'three'"),
    ("instruct.global_batch_size=100", "instruct.global_batch_size: 100 is not divisible by scaling.num_workers"),
    ("instruct.dataset=missing", "instruct.dataset: 'missing' is not a key of datasets"),
])
def test_validate_exits_non_zero_with_the_yaml_path(override, fragment):
    result = validate("workflows/llava-v1.5-7b.yaml", "--set", override)
    assert result.returncode == 2 and fragment in result.stderr, result.stderr


def test_each_stage_needs_its_kind_of_rows_and_something_to_start_from():
    """A stage's dataset is of the kind it trains on; with align or instruct null, what a stage starts from (an
    official projector, the model preference.init_from names) must be named, and something must be exported."""
    from llava_core.config import read_workflow_file, workflow_from_dict

    def problems(*overrides) -> list[str]:
        try:
            workflow_from_dict(read_workflow_file(os.path.join(ROOT, "workflows", "quickstart.yaml"), overrides))
        except WorkflowError as error:
            return error.problems
        return []

    assert problems("preference.dataset=instruct", "preference.eval_dataset=align") == [
        "preference.dataset: dataset 'instruct' is of kind conversations; this stage trains on preference rows "
        "(datasets.instruct.kind)",
        "preference.eval_dataset: dataset 'align' is of kind conversations; this stage trains on preference rows "
        "(datasets.align.kind)"]
    assert problems("instruct.dataset=preference") == [
        "instruct.dataset: dataset 'preference' is of kind preference; this stage trains on conversations rows "
        "(datasets.preference.kind)"]
    assert problems("align=null") == ["instruct.init_projector: no stage before instruct trains a projector (align "
                                      "is null); name an official `mm_projector.bin`"]
    assert problems("align=null", "instruct.init_projector=mm_projector.bin") == []
    assert problems("instruct=null") == ["preference.init_from: instruct is null, so name the model to tune (an "
                                         "export or hub id)"]
    assert problems("instruct=null", "preference=null") == [
        "instruct: null leaves no model to export; keep instruct or add a preference stage"]
    assert problems("instruct=null", "preference.packing=true", "preference.init_from=llava-hf/x")[0].startswith(
        "preference.packing: a pair's two answers share one prompt")


def test_a_stage_whose_input_is_missing_is_refused_before_work(tmp_path):
    from llava_core.workflow import RunContext, check_upstream, compute_hashes

    workflow = cluster_workflow(tmp_path, f"storage={tmp_path / 'runs'}")
    ctx = RunContext(workflow, workflow.run_dir, "", "", hashes=compute_hashes(workflow))
    with pytest.raises(WorkflowError, match="--only/--from instruct: it needs the align stage's output"):
        check_upstream(ctx, ["instruct", "export", "evaluate", "serve"])
    check_upstream(ctx, ["prepare", "align", "instruct"])  # each input is produced first: fine
    official = cluster_workflow(tmp_path, f"storage={tmp_path / 'runs'}", "instruct.init_projector=mm_projector.bin")
    with pytest.raises(WorkflowError, match="it needs the prepare stage's output"):  # not align's
        check_upstream(RunContext(official, official.run_dir, "", "", hashes=compute_hashes(official)), ["instruct"])


def test_plan_memory_follows_the_zero_stage(monkeypatch):
    from llava_core.plan import build_plan

    for name, value in OFFLINE_AWS.items():  # the recipe's example bucket: a region set, no lookup of it
        monkeypatch.setenv(name, value)

    base = os.path.join(ROOT, "workflows", "llava-v1.5-7b.yaml")
    memory = {zero: next(s for s in build_plan(load_workflow(base, [f"instruct.zero_stage={zero}"]))["stages"]
                         if s["stage"] == "instruct")["memory_per_gpu_gb"] for zero in (2, 3)}
    # ZeRO-3 also shards the 13.5 GB of bf16 weights over 8 GPUs.
    assert memory[3]["weights"] == pytest.approx(memory[2]["weights"] / 8, rel=0.01)
    assert memory[3]["optimizer"] == memory[2]["optimizer"]


def test_plan_memory_keeps_the_activations_of_the_layers_that_do_not_recompute(monkeypatch):
    from llava_core.plan import build_plan

    for name, value in OFFLINE_AWS.items():
        monkeypatch.setenv(name, value)
    base = os.path.join(ROOT, "workflows", "llava-v1.5-7b.yaml")

    def align(*overrides):
        stage = next(s for s in build_plan(load_workflow(base, list(overrides)))["stages"] if s["stage"] == "align")
        return stage["memory_per_gpu_gb"]["activations"] * 1e9 / stage["memory_micro_batch"]["tokens"] / 4096

    # bytes per token / hidden size: Vicuna-7B's 32 layers, 2 B each input of a recomputed layer, 34 B each layer
    # that keeps its activations, one recomputed layer's 34 B while it runs backward
    assert align("align.gradient_checkpointing=false", "align.recompute_every=1") == pytest.approx(34 * 32, rel=1e-3)
    assert align("align.recompute_every=1") == pytest.approx(2 * 32 + 34, rel=1e-3)
    assert align("align.recompute_every=4") == pytest.approx(2 * 8 + 34 * 24 + 34, rel=1e-3)
    assert align("align.recompute_every=5") == pytest.approx(2 * 7 + 34 * 25 + 34, rel=1e-3)  # 0, 5, ..., 30


def test_plan_counts_the_rows_of_local_files_it_has_no_known_size_for(tmp_path):
    """A dataset file of any name is counted by streaming it: JSONL (blank lines skipped), JSON array, parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llava_core.plan import build_plan, source_rows

    row = {"id": "0", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "A square."}]}
    captions = tmp_path / "my_captions.jsonl"
    captions.write_text("\n".join(json.dumps(row) for _ in range(300)) + "\n\n")
    chats = tmp_path / "my_chats.json"
    chats.write_text(json.dumps([row] * 130))
    workflow = cluster_workflow(tmp_path, f"storage={tmp_path / 'runs'}", f"datasets.align.path={captions}",
                                f"datasets.instruct.path={chats}")
    stages = {s["stage"]: s for s in build_plan(workflow)["stages"]}
    assert (stages["align"]["rows"], stages["align"]["rows_from"]) == (300, "counted")
    assert (stages["instruct"]["rows"], stages["instruct"]["rows_from"]) == (130, "counted")
    assert stages["align"]["steps"] == 300 // 256 and stages["instruct"]["steps"] == 130 // 128
    hub = tmp_path / "train-00000.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(42)], "conversations": [json.dumps(row)] * 42}), hub)
    assert source_rows(str(hub)) == (42, "counted")


def test_plan_takes_rows_and_tokens_from_the_prepare_manifest_when_it_exists(tmp_path):
    from llava_core import storage
    from llava_core.plan import build_plan

    workflow = cluster_workflow(tmp_path, f"storage={tmp_path / 'runs'}")
    unprepared = {s["stage"]: s for s in build_plan(workflow)["stages"]}
    storage.write_json(storage.join(workflow.run_dir, "prepare", "manifest.json"),
                       {"datasets": {"align": {"rows_written": 512, "tokens": 512 * 600, "text_only_rows": 0,
                                                   "supervised_tokens": 512 * 20, "longest_row": 1500}}})
    stages = {s["stage"]: s for s in build_plan(workflow)["stages"]}
    assert (stages["align"]["rows"], stages["align"]["rows_from"]) == (512, "prepare manifest")
    assert (stages["align"]["tokens_per_row"], stages["align"]["tokens_from"]) == (600, "prepare manifest")
    assert stages["instruct"]["rows"] == 0 and stages["instruct"]["rows_from"] == "counted"  # not prepared: "[]"
    # memory is sized for micro-batches of the longest prepared row (length grouping puts those together)
    micro = workflow.align.micro_batch_size
    assert stages["align"]["memory_micro_batch"] == {"tokens": micro * 1500, "from": "the longest prepared row"}
    before = unprepared["align"]["memory_micro_batch"]
    assert before["from"].startswith("average rows") and before["tokens"] < micro * 1500
    activations = [plan["align"]["memory_per_gpu_gb"]["activations"] for plan in (stages, unprepared)]
    assert activations[0] / activations[1] == pytest.approx(micro * 1500 / before["tokens"], rel=0.01)


def test_a_workflow_that_only_preference_tunes_a_named_model_reads_no_base_model(monkeypatch):
    """The DPO recipe without a mirror: its base models' hub ids are fetched by nobody (prepare and training read the
    checkpoint `init_from` names); with a stage or a dataset that reads them, they are resolved as always."""
    from llava_core.model import base_models
    from llava_core.workflow import needs_base_models, resolve_base_models

    def no_fetch(name, mirror, run_dir):
        raise AssertionError(f"{name} was resolved")

    dpo = os.path.join(ROOT, "workflows", "llava-onevision-qwen2-7b-dpo.yaml")
    monkeypatch.setattr(base_models, "base_model_location", no_fetch)
    only_dpo = load_workflow(dpo)
    assert not needs_base_models(only_dpo) and resolve_base_models(only_dpo) == ("", "")
    with_captions = load_workflow(dpo, ["datasets.captions.path=s3://b/c.json", "datasets.captions.template=plain"])
    assert needs_base_models(with_captions)  # a dataset prepared with the base models' processor
    assert needs_base_models(load_workflow(os.path.join(ROOT, "workflows", "quickstart.yaml")))  # stages from them
