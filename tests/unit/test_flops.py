"""One FLOP model: the plan (from configs) and the runtime MFU (from the model's parameters) count the same FLOPs;
one peak table, matched from CUDA device names."""
import os

import pytest

from llava_core import plan
from llava_core.config import load_workflow
from llava_core.flops import GPUS, coefficients, gpu_for_device
from llava_core.train.metrics import flops_counter, peak_flops

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_6n_trained_4n_gradients_through_2n_forward_only():
    assert coefficients(["projector"], lora=False) == {"vision": 2, "projector": 6, "llm": 4, "lora": 6}
    assert coefficients(["projector", "llm"], lora=False)["llm"] == 6
    assert coefficients(["projector", "llm"], lora=True)["llm"] == 4
    assert coefficients(["llm"], lora=False) == {"vision": 2, "projector": 2, "llm": 6, "lora": 6}
    assert coefficients(["vision"], lora=False) == {"vision": 6, "projector": 4, "llm": 4, "lora": 6}


@pytest.mark.parametrize("stage_name, overrides", [
    ("align", []),  # projector only
    ("instruct", []),  # projector + the whole LLM
    ("instruct", ["instruct.lora={r: 8, target_modules: [q_proj, v_proj, down_proj]}"]),  # projector + LoRA
])
def test_plan_and_runtime_count_the_same_flops(tiny_dataset, stage_name, overrides):
    from llava_core.model.build import assemble
    from llava_core.model.lora import is_kept_original
    from llava_core.train.freeze import apply_stage_training

    workflow = load_workflow(os.path.join(ROOT, "workflows", "quickstart.yaml"), [
        f"model.vision_tower={tiny_dataset['vision']}", f"model.llm={tiny_dataset['llm']}", *overrides])
    stage = getattr(workflow, stage_name)
    model, _ = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    model = apply_stage_training(model, stage.trainable, stage.lora)  # the loop's own steps, as it counts them
    runtime = flops_counter(model, stage.trainable, stage.lora is not None)
    size = plan.model_size(workflow)

    for tokens, images, supervised in ((100, 0, 40), (100, 1, 0), (300, 3, 120)):
        row = plan.RowAverages(tokens, images, supervised, "")
        assert plan.stage_flops_per_row(stage, size, row) == runtime(tokens, images, tokens ** 2, supervised)
    # peft's frozen original of each modules_to_save part (the projector under LoRA) is not the model's.
    params = {n: p.numel() for n, p in model.named_parameters() if not is_kept_original(n)}
    assert sum(size.params.values()) == sum(v for n, v in params.items() if "lora_" not in n)  # memory's count
    if stage.lora is not None:
        assert plan.trained_params(stage, size)["llm"] == sum(v for n, v in params.items() if "lora_" in n)


def test_vicuna_7b_instruct_flops_by_hand():
    """Vicuna-7B v1.5 (hidden 4096, 32 layers, MLP 11008, vocab 32000 + <image> + <pad> = 32002 tokens in 32064
    rows, a multiple of 64), per layer 4 x 4096^2 (q,k,v,o) + 3 x 4096 x 11008 (gate, up, down) + 2 x 4096 (norms)
    = 202,383,360; x 32 layers = 6,476,267,520, + 4096 (final norm) = 6,476,271,616 parameters on every token; the
    lm_head's 32064 x 4096 = 131,334,144 on supervised tokens only (the input embedding lookup is no matmul).
    Instruct trains the LLM: 6 x 6,476,271,616 = 38,857,629,696 FLOPs per token, 6 x 131,334,144 = 788,004,864 more
    per supervised one. Per image: the frozen CLIP ViT-L/14-336 (303,507,456 parameters) forward over 577 positions,
    2 x 303,507,456 x 577 = 350,247,604,224, and the trained projector (1024 x 4096 + 4096 + 4096^2 + 4096 =
    20,979,712) over 576 tokens, 6 x 20,979,712 x 576 = 72,505,884,672. Attention: the frozen tower's 24 layers
    forward over 577 positions both ways, 24 x 4 x 577^2 x 1024 = 32,728,252,416 per image; the trained LLM's causal
    attention, 3 (forward + backward) x 2 x 32 layers x 4096 = 786,432 per squared token: 503,316,480,000 for a row
    of 800 tokens, 1.6% of its 6N x 800."""
    workflow = load_workflow(os.path.join(ROOT, "workflows", "llava-v1.5-7b.yaml"))
    size = plan.model_size(workflow)
    assert size.params == {"llm": 6_738_939_904, "vision": 303_507_456, "projector": 20_979_712}

    def row(tokens, views, supervised):
        return plan.stage_flops_per_row(workflow.instruct, size, plan.RowAverages(tokens, views, supervised, ""))

    assert row(1, 0, 0) == 38_857_629_696 + 786_432
    assert row(1, 0, 1) - row(1, 0, 0) == 788_004_864
    assert row(0, 1, 0) == 350_247_604_224 + 72_505_884_672 + 32_728_252_416
    assert row(800, 0, 400) == 800 * 38_857_629_696 + 400 * 788_004_864 + 503_316_480_000


@pytest.mark.parametrize("device, gpu", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100 80GB PCIe", "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100-PCIE-40GB", "a100-40gb"), ("NVIDIA L40S", "l40s"),
    ("NVIDIA L4", "l4"),
    # Not in the table: no MFU rather than a wrong one (the H200 NVL's peak is lower; GH200 and L40 are others).
    ("NVIDIA H200 NVL", None), ("NVIDIA GH200 480GB", None), ("NVIDIA L40", None), ("NVIDIA A10G", None),
    ("Tesla T4", None),
])
def test_device_names_find_their_gpu(device, gpu):
    assert gpu_for_device(device) == gpu


def test_the_runtime_peak_comes_from_the_table_unless_configured(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H100 PCIe")
    assert peak_flops(None, use_gpu=True) == GPUS["h100-pcie"].tflops * 1e12 == 756e12
    assert peak_flops(500.0, use_gpu=True) == 500e12  # scaling.peak_tflops_per_worker wins
    assert peak_flops(None, use_gpu=False) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla T4")
    assert peak_flops(None, use_gpu=True) is None


def test_the_dpo_recipe_prices_both_sequences_of_a_pair_and_the_reference_pass():
    """A preference row is a pair: two sequences with the pair's images, trained forward and backward, plus the
    reference pass's forward over both before training. Priced from a prepared manifest's counts (tokens and
    supervised tokens of both sequences) exactly as that arithmetic, by the FLOP model's own counter."""
    from llava_core.flops import training_flops

    workflow = load_workflow(os.path.join(ROOT, "workflows", "llava-onevision-qwen2-7b-dpo.yaml"))
    stage, size = workflow.preference, plan.model_size(workflow)
    prepared = {"preference": {"rows_written": 1000, "text_only_rows": 0, "tokens": 1000 * 2 * 3000,
                               "supervised_tokens": 1000 * 2 * 100}}
    priced = plan.training_plan(workflow, "preference", size, prepared, "h100-sxm", 0.4)
    steps = 1000 // stage.global_batch_size  # one epoch, the partial batch dropped
    pairs = steps * stage.global_batch_size
    views = size.views_per_image

    def sequence(trainable):
        return training_flops(size.parts, trainable, False)(3000, views, 3000 ** 2, 100)

    assert priced["steps"] == steps and priced["tokens_per_row"] == 6000 and priced["tokens"] == pairs * 6000
    assert priced["reference_flops"] == pytest.approx(pairs * 2 * sequence([]))
    assert priced["flops"] == pytest.approx(pairs * 2 * (sequence(["vision", "projector", "llm"]) + sequence([])))
    # full training is ~3x a forward: the reference pass adds about a third
    assert 0.28 < priced["reference_flops"] / (priced["flops"] - priced["reference_flops"]) < 0.36
    assert priced["memory_per_gpu_gb"]["total"] < 80  # ZeRO-3 over 8 H100s, checkpointed activations
