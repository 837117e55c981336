"""The workflow schema: every problem of a file at once, its JSON Schema for editors, the docs' tables it generates."""
import glob
import json
import os
import subprocess
import sys

import jsonschema
import pytest

from llava_core import reference
from llava_core.config import WorkflowError, load_workflow, read_yaml, serve_settings_from_dict
from llava_core.schema import TinyModelSettings

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.yaml")))
QUICKSTART = os.path.join(ROOT, "workflows", "quickstart.yaml")


def test_three_mistakes_are_reported_at_once_each_with_its_path(tmp_path):
    data = read_yaml(open(QUICKSTART))
    data["instruct"]["lrr"] = 1e-4  # an unknown key, one letter off
    data["scaling"]["num_workers"] = "two"  # a wrong type
    data["align"]["sampling"] = "length_grupped"  # not one of the enumeration
    path = tmp_path / "w.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(WorkflowError) as error:
        load_workflow(str(path))
    assert sorted(error.value.problems) == [
        "align.sampling: 'length_grupped' is not one of ['random', 'length_grouped', 'modality_grouped'] "
        "(did you mean 'length_grouped'?)",
        "instruct.lrr: unknown key (did you mean 'lr'?)",
        "scaling.num_workers: expected int, got 'two'",
    ]
    assert str(error.value).startswith("3 problem(s):\n  ")


def test_a_sections_contradicting_settings_are_all_reported():
    with pytest.raises(WorkflowError) as error:
        load_workflow(QUICKSTART, ["instruct.offload_params=true", "instruct.packing=true",
                                   "instruct.sampling=modality_grouped", "instruct.gradient_checkpointing=false",
                                   "instruct.recompute_every=2", "serve.max_queued_requests=0"])
    assert error.value.problems == [
        "instruct.offload_params: needs zero_stage 3 (ZeRO 1/2 keep parameters on the device)",
        "instruct.recompute_every: needs gradient_checkpointing",
        "instruct.packing: packs rows of any modality together; use sampling random or length_grouped with packing",
        "serve.max_queued_requests: a positive number, or -1 for no limit",
    ]


def test_hpz_needs_zero3_and_divides_the_workers():
    recipe = os.path.join(ROOT, "workflows", "llava-v1.5-13b.yaml")
    with pytest.raises(WorkflowError) as refused:
        load_workflow(recipe, ["align.zero_hpz_partition_size=8"])  # align runs ZeRO-2
    assert refused.value.problems == [
        "align.zero_hpz_partition_size: needs zero_stage 3 (it partitions the weights a second time)"]
    with pytest.raises(WorkflowError) as refused:
        load_workflow(recipe, ["instruct.zero_hpz_partition_size=3"])
    assert refused.value.problems == [
        "instruct.zero_hpz_partition_size: 3 does not divide scaling.num_workers = 8 (it is the ranks of one node)"]


def test_rules_across_sections_are_all_reported_once_the_sections_are_valid():
    with pytest.raises(WorkflowError) as error:
        load_workflow(QUICKSTART, ["align.dataset=nothing", "instruct.micro_batch_size=5",
                                   "prepare.image_aspect_ratio=anyres"])
    assert [p.split(":")[0] for p in error.value.problems] == [
        "align.dataset", "instruct.global_batch_size", "prepare.image_aspect_ratio"]
    # 32 rows a step over 2 workers: 5 a worker cannot make a whole accumulation; the advice keeps the step
    assert error.value.problems[1].endswith("must be a whole number (micro_batch_size 4 gives accumulation 4)")


@pytest.mark.parametrize("override, message", [
    ("instruct.zero_stage=true", "instruct.zero_stage: True is not one of [0, 1, 2, 3]"),  # True == 1 in Python
    ("instruct.epochs=0", "instruct.epochs: 0 must be at least 1"),
    ("instruct.lora={dropout: 1}", "instruct.lora.dropout: 1 is not in [0, 1)"),
    ("synthetic.description_noise=1", "synthetic.description_noise: 1 is not in [0, 1)"),
    ("synthetic.preference_pairs=-1", "synthetic.preference_pairs: -1 must be at least 0"),
    ("instruct.trainable=[]", "instruct.trainable: empty; choose from ['projector', 'llm', 'vision']"),
    ("model.family=llava_nxt", "(did you mean 'llava_next'?)"),
    ("name=7", "name: expected str, got 7"),
    ("scaling.use_gpu=1", "scaling.use_gpu: expected bool, got 1"),
    ("prepare=null", "prepare: expected a mapping, got None"),
    ("datasets.align.sources=[{path: x}]", "datasets.align: give either path (one source) or sources"),
    ("datasets.align.sources=[{image_folder: x}]", "datasets.align.sources[0].path: required"),
])
def test_strict_values_name_their_path(override, message):
    with pytest.raises(WorkflowError) as error:
        load_workflow(QUICKSTART, [override])
    assert message in str(error.value)


def test_yaml_numbers_read_as_editors_read_them():
    """PyYAML takes `1e-4` for a string (YAML 1.1); the loader, like editors (YAML 1.2), reads a number."""
    assert read_yaml("lr: 1e-4\nsteps: 10\nname: 1e4x") == {"lr": 1e-4, "steps": 10, "name": "1e4x"}
    assert load_workflow(QUICKSTART, ["instruct.lr=2e-5"]).instruct.lr == 2e-5


def test_serve_settings_are_checked_like_a_workflow_under_their_own_prefix():
    with pytest.raises(WorkflowError) as error:
        serve_settings_from_dict({"port": "80", "max_batch": 4}, "args.settings")
    assert error.value.problems == ["args.settings.port: expected int, got '80'",
                                    "args.settings.max_batch: unknown key (did you mean 'max_batch_size'?)"]


@pytest.fixture(scope="module")
def printed_schema() -> dict:
    """What `llava-ray schema` prints."""
    schema = json.loads(subprocess.run([sys.executable, "-m", "llava_core.cli", "schema"], capture_output=True,
                                       text=True, check=True, cwd=ROOT, timeout=120).stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_workflow_names_the_schema_and_validates_against_it(path, printed_schema):
    with open(path) as f:
        first = f.readline()
    assert first == "# yaml-language-server: $schema=./schema.json\n"
    errors = [f"{list(e.path)}: {e.message}"
              for e in jsonschema.Draft202012Validator(printed_schema).iter_errors(read_yaml(open(path)))]
    assert errors == []
    load_workflow(path)  # and the loader agrees


def test_the_schema_refuses_what_the_loader_refuses(printed_schema):
    data = read_yaml(open(QUICKSTART))
    data["instruct"]["lrr"], data["serve"]["overload_status"], data["prepare"]["max_length"] = 1, 500, 0
    errors = {tuple(e.path) for e in jsonschema.Draft202012Validator(printed_schema).iter_errors(data)}
    assert errors == {("instruct",), ("serve", "overload_status"), ("prepare", "max_length")}


def test_the_committed_schema_file_is_the_printed_one(printed_schema):
    with open(os.path.join(ROOT, reference.SCHEMA_FILE)) as f:
        text = f.read()
    assert text == reference.json_schema_text() and json.loads(text) == printed_schema, \
        "run: python -m llava_core.reference --write"


@pytest.mark.parametrize("page", sorted(set(reference.TABLE_PAGES.values())))
def test_the_docs_tables_are_the_generated_ones(page):
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    assert reference.page_with_tables(page, text) == text, "run: python -m llava_core.reference --write"


def test_every_setting_has_its_row_nested_ones_too():
    text = "".join(open(os.path.join(ROOT, page)).read() for page in set(reference.TABLE_PAGES.values()))
    for key in ("`evaluate.endpoint.timeout_s`", "`serve.autoscaling.min_replicas`", "`lora.target_modules`",
                "`serve.vllm.direct_streaming`", "`max_failures`"):
        assert key in text


def test_every_setting_has_a_description():
    undocumented = [row[0] for table in (reference.rows(reference.Workflow, ""),
                                         reference.rows(reference.ServeSettings, "serve."),
                                         reference.rows(reference.TrainStageSettings, ""))
                    for row in table if not row[3]]
    assert undocumented == []


def test_the_stand_in_models_take_the_workflows_sizes():
    """One definition: the stand-ins' config is the workflow section plus what a workflow does not set."""
    from llava_core.quickstart.standins import TinyModelConfig

    assert issubclass(TinyModelConfig, TinyModelSettings)
    assert TinyModelConfig().tower_pretraining_steps == TinyModelSettings().tower_pretraining_steps
