"""The datasets and prepare sections of a workflow: mixtures, sampling and limits, checked before anything runs."""
import pytest
import yaml

from llava_core.config import SourceSettings, WorkflowError, dataset_sources, load_workflow

QUICKSTART = "workflows/quickstart.yaml"


def _with_instruct(tmp_path, instruct: dict) -> str:
    data = yaml.safe_load(open(QUICKSTART))
    data["datasets"]["instruct"] = instruct
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_mixture_loads_with_its_sources_resolved(tmp_path):
    path = _with_instruct(tmp_path, {"template": "chat_template", "sources": [
        {"path": "a.json", "image_folder": "imgs", "sampling": "first:10%"},
        {"path": "s3://bucket/b.parquet", "sampling": "random:500", "seed": 3}]})
    w = load_workflow(path)
    sources = dataset_sources(w.datasets["instruct"])
    assert all(isinstance(s, SourceSettings) for s in sources)
    assert sources[0].path.startswith("/") and sources[0].path.endswith("/a.json")
    assert sources[1] == SourceSettings("s3://bucket/b.parquet", "", "random:500", 3)
    single = dataset_sources(w.datasets["align"])  # the quickstart's single-path form still works
    assert len(single) == 1 and single[0].path == w.datasets["align"].path and single[0].sampling == "all"


@pytest.mark.parametrize("instruct, message", [
    ({"sources": [{"path": "a.json", "samplng": "all"}]}, "datasets.instruct.sources[0].samplng: unknown key"),
    ({"sources": [{"path": "a.json", "sampling": "half"}]}, "datasets.instruct.sources[0].sampling: sampling 'half'"),
    ({"path": "a.json", "sampling": "first:x"}, "datasets.instruct.sampling: sampling 'first:x'"),
    ({"path": "a.json", "sources": [{"path": "b.json"}]}, "not both"),
    ({"sources": [{"image_folder": "x"}]}, "datasets.instruct.sources[0].path: required"),
    ({"template": "chatml"}, "datasets.instruct.template: 'chatml'"),
])
def test_bad_dataset_settings_name_their_yaml_path(tmp_path, instruct, message):
    with pytest.raises(WorkflowError) as error:
        load_workflow(_with_instruct(tmp_path, instruct))
    assert message in str(error.value)


@pytest.mark.parametrize("override, message", [
    ("prepare.max_reject_fraction=1.5", "prepare.max_reject_fraction: 1.5 is not between 0 and 1"),
    ("prepare.rows_per_shard=0", "prepare.rows_per_shard: 0 must be at least 1"),
    ("prepare.too_long=cut", "prepare.too_long: 'cut'"),
])
def test_bad_prepare_settings(override, message):
    with pytest.raises(WorkflowError) as error:
        load_workflow(QUICKSTART, [override])
    assert message in str(error.value)
