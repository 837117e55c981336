"""Ablations: the sibling workflow each one describes, its validation, and the comparison summary.json records."""
import pytest

from llava_core.ablations import ablated, comparison
from llava_core.config import WorkflowError, load_workflow

QUICKSTART = "workflows/quickstart.yaml"


def test_an_ablation_is_the_workflow_with_its_settings_and_its_own_run():
    w = load_workflow(QUICKSTART, ["ablations={square: {prepare.image_aspect_ratio: square, instruct.epochs: 1}}"])
    sibling = ablated(w, "square")
    assert (sibling.name, sibling.prepare.image_aspect_ratio, sibling.instruct.epochs) == ("quickstart-square",
                                                                                           "square", 1)
    assert sibling.run_dir.endswith("/quickstart-square") and sibling.ablations == {}
    # Everything else is the workflow's own: the same data, base models, budget and seed.
    assert (sibling.datasets, sibling.model, sibling.align, sibling.synthetic) == (w.datasets, w.model, w.align,
                                                                                   w.synthetic)
    assert w.prepare.image_aspect_ratio == "pad" and w.instruct.epochs == 8  # the workflow itself is untouched


@pytest.mark.parametrize("ablation, fragment", [
    ("{pad: {prepare.image_aspect_ratio: anyres}}", "ablations.pad: prepare.image_aspect_ratio: 'anyres' does not"),
    ("{pad: {prepare.image_aspect_rato: pad}}", "did you mean 'image_aspect_ratio'"),
    ("{pad: {prepar.image_aspect_ratio: pad}}", "prepar is not a section"),
    ("{pad: {}}", "ablations.pad: expected a mapping"),
])
def test_a_bad_ablation_is_a_workflow_error_naming_it(ablation, fragment):
    with pytest.raises(WorkflowError, match="ablations.pad") as caught:
        load_workflow(QUICKSTART, [f"ablations={ablation}"])
    assert fragment in str(caught.value)


def test_the_comparison_is_the_workflows_lead_overall_and_per_category():
    own = {"accuracy": 0.9, "by_category": {"highres": 0.85, "colour": 0.95}}
    sibling = {"accuracy": 0.6, "blind_accuracy": 0.3, "by_category": {"highres": 0.3, "colour": 0.96}}
    assert comparison(own, sibling) == {
        "accuracy": 0.6, "blind_accuracy": 0.3, "by_category": sibling["by_category"], "accuracy_gain": 0.3,
        "by_category_gain": {"highres": 0.55, "colour": -0.01}}
