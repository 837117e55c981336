"""The full-size recipes validate and plan here without downloading anything, and the plan warns before a stage
that cannot fit the GPU (the checks themselves: tests/unit/test_workflow_checks.py)."""
import json

import pytest

from tests.workflow_checks_helpers import validate

FULL_SIZE = ["llava-v1.5-7b.yaml", "llava-v1.5-13b.yaml", "llava-v1.5-7b-lora.yaml"]


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_workflows_validate_and_plan_here_without_downloading(name):
    result = validate(f"workflows/{name}", "--plan", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout[result.stdout.index("{"):])
    stages = {s["stage"]: s for s in plan["stages"]}
    align, instruct = stages["align"], stages["instruct"]
    assert align["workers"] == instruct["workers"] == 8
    assert align["rows"] == 558_128 and instruct["rows"] == 665_298
    assert align["steps"] == 558_128 // 256 and instruct["steps"] == 665_298 // 128
    assert set(align["trainable"]) == {"projector"} and set(instruct["trainable"]) == {"projector", "llm"}
    assert 15e6 < align["trainable"]["projector"] < 35e6  # LLaVA-1.5's mlp2x_gelu: ~21M (7B), ~31M (13B)
    # The recipe's wall times on 8x A100 are ~3.5-5.5 h (align) and ~10-20 h (instruct): the plan is in that range.
    assert 2 < align["wall_hours"] < 12 and 5 < instruct["wall_hours"] < 40
    assert 5 < instruct["memory_per_gpu_gb"]["total"] < 80, instruct["memory_per_gpu_gb"]


def test_plan_warns_before_a_stage_that_cannot_fit_the_gpu():
    fits = validate("workflows/llava-v1.5-13b.yaml", "--plan")  # the plan as text too
    assert fits.returncode == 0 and "warning:" not in fits.stdout
    assert "GPU-hours" in fits.stdout and "memory per GPU" in fits.stdout
    too_big = validate("workflows/llava-v1.5-13b.yaml", "--plan", "--set", "instruct.zero_stage=2",
                       "--set", "instruct.gradient_checkpointing=false")
    assert "warning: needs ~" in too_big.stdout and "raise zero_stage" in too_big.stdout
