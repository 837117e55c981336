"""Workflow files: precise errors before any work starts, overrides, stage hashes."""
import pytest

from llava_core.config import WorkflowError, load_workflow
from llava_core.workflow import compute_hashes

QUICKSTART = "workflows/quickstart.yaml"


def test_quickstart_loads_with_absolute_local_paths():
    w = load_workflow(QUICKSTART)
    assert w.align.trainable == ["projector"] and w.instruct.trainable == ["projector", "llm"]
    assert w.datasets["align"].template == "plain" and w.datasets["instruct"].template == "vicuna_v1"
    assert w.datasets["align"].path.startswith("/") and w.model.llm.startswith("/")


@pytest.mark.parametrize("override, message", [
    ("instruct.lrr=1", "instruct.lrr: unknown key (did you mean 'lr'?)"),
    ("instruct.lr=fast", "instruct.lr: expected float, got 'fast'"),
    ("align.epochs=1.5", "align.epochs: expected int, got 1.5"),
    ("instruct.global_batch_size=30", "instruct.global_batch_size: 30 is not divisible"),
    ("align.dataset=nothing", "align.dataset: 'nothing' is not a key of datasets"),
    ("align.trainable=[lm]", "align.trainable"),
    ("datasets.align.template=llama9", "datasets.align.template: 'llama9'"),
    ("serve.ready_timeout_s=0", "serve.ready_timeout_s: must be greater than 0"),
])
def test_bad_settings_name_their_yaml_path(override, message):
    with pytest.raises(WorkflowError) as error:
        load_workflow(QUICKSTART, [override])
    assert message in str(error.value)


def test_override_changes_only_that_stage_and_later_hashes():
    base = compute_hashes(load_workflow(QUICKSTART))
    changed = compute_hashes(load_workflow(QUICKSTART, ["instruct.lr=5e-4"]))
    assert changed["prepare"] == base["prepare"] and changed["align"] == base["align"]
    assert all(changed[s] != base[s] for s in ("instruct", "export", "evaluate", "serve"))
    assert load_workflow(QUICKSTART, ["instruct.lr=5e-4"]).instruct.lr == 5e-4


def test_a_partial_stage_section_keeps_that_stages_llava_defaults(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("datasets: {align: {path: a.json, template: plain}, instruct: {path: b.json}}\n"
                    "align: {epochs: 2}\ninstruct: {lr: 1.0e-5}\n")
    w = load_workflow(str(path))
    assert (w.align.trainable, w.align.lr, w.align.epochs) == (["projector"], 1e-3, 2)
    assert (w.instruct.trainable, w.instruct.lr, w.instruct.dataset) == (["projector", "llm"], 1e-5, "instruct")
