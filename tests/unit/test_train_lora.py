"""What trains: LoRA on the LLM only, the projector in the adapter as peft's modules_to_save; parameter groups; the
official projector (trained, merged into a plain HF checkpoint and exported: tests/integration/test_train_lora.py)."""
import os

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from llava_core.model.build import assemble, load_official_projector
from llava_core.train.freeze import apply_stage_training, describe_training, parameter_groups
from tests.train_lora_helpers import LORA, assert_same_weights, tiny_batch


def test_lora_wraps_only_llm_linears_and_groups_report_what_trains(tiny_dataset):
    model, _ = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    model = apply_stage_training(model, ["projector", "llm"], LORA)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    lora_modules = {n.split(".lora_")[0] for n in trained if "lora_" in n}
    assert lora_modules and all(".language_model." in n for n in lora_modules)
    assert {n.rsplit(".", 1)[-1] for n in lora_modules} == set(LORA.target_modules)
    non_lora = [n for n in trained if "lora_" not in n]  # the projector: peft's modules_to_save copy
    assert non_lora and all("multi_modal_projector.modules_to_save.default." in n for n in non_lora)
    originals = [p for n, p in model.named_parameters() if ".multi_modal_projector.original_module." in n]
    assert originals and not any(p.requires_grad for p in originals)

    groups = parameter_groups(model, lr=2e-4, projector_lr=2e-5, weight_decay=0.1)
    report = describe_training(model, groups)
    projector = model.get_base_model().model.multi_modal_projector.modules_to_save["default"]  # the trained copy
    assert report["trained"]["projector"] == {"parameters": sum(p.numel() for p in projector.parameters()),
                                              "lr": 2e-5}
    assert report["trained"]["lora"]["lr"] == 2e-4 and set(report["trained"]) == {"projector", "lora"}
    assert report["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert set(report["frozen"]) == {"llm", "vision"}  # peft's frozen original projector is not counted
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    plain = LlavaForConditionalGeneration(model.get_base_model().config)
    assert lora and report["total_parameters"] == sum(p.numel() for p in plain.parameters()) + lora
    # biases get no weight decay, matrices do
    assert all(g["weight_decay"] == (0.1 if g["params"][0].ndim >= 2 else 0.0) for g in groups)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_the_adapter_alone_restores_the_trained_projector_and_logits(tiny_dataset, tmp_path, family):
    """base + `PeftModel.from_pretrained(base, adapter)` is the trained model: LoRA and the projector (peft's
    modules_to_save), nothing beside the adapter. LLaVA-NeXT's `image_newline` counts with the LLM, which LoRA
    keeps frozen: the base's own value is the trained model's."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from llava_core.model import build
    from llava_core.model.lora import save_adapter

    torch.manual_seed(0)
    model, processor = build.assemble(family, tiny_dataset["vision"], tiny_dataset["llm"])
    base_dir = str(tmp_path / "base")
    model.save_pretrained(base_dir)
    model = apply_stage_training(model, ["projector", "llm"], LORA)
    llava = model.get_base_model()
    newline = getattr(llava.model, "image_newline", None)
    assert newline is None or not newline.requires_grad
    projector_before = {k: v.clone() for k, v in llava.model.multi_modal_projector.modules_to_save.default
                        .state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = family_batch(llava, processor, family)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    trained = llava.model.multi_modal_projector.modules_to_save["default"]
    assert not torch.equal(trained.linear_1.weight, projector_before["linear_1.weight"])  # the projector trained
    with torch.no_grad():
        trained_logits = model(**batch).logits

    adapter = str(tmp_path / "adapter")
    assert sorted(save_adapter(model, adapter)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert any("multi_modal_projector" in k for k in saved) and not any("original_module" in k for k in saved)

    base = type(llava).from_pretrained(base_dir)
    assert not torch.equal(base.model.multi_modal_projector.linear_1.weight, trained.linear_1.weight)
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    assert_same_weights(reloaded.get_base_model().model.multi_modal_projector.modules_to_save["default"], trained)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained_logits)
    merged = reloaded.merge_and_unload()  # peft's own merge puts the trained projector in place
    assert_same_weights(merged.model.multi_modal_projector, trained)


def family_batch(model, processor, family):
    """A two-image batch the family's processor lays out (AnyRes tiles for LLaVA-NeXT)."""
    if family == "llava":
        return tiny_batch(model, processor)
    from PIL import Image

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}],
        add_generation_prompt=True)
    images = [Image.new("RGB", (90, 40), (200, 30, 30)), Image.new("RGB", (40, 70), (30, 30, 200))]
    inputs = dict(processor(images=images, text=[prompt, prompt], return_tensors="pt", padding=True))
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    return inputs


def test_a_bare_parameter_cannot_be_a_modules_to_save(tiny_dataset):
    """peft saves whole modules only: a part that is a bare nn.Parameter (`image_newline`) fails loudly instead of
    training without being saved in the adapter."""
    from llava_core.model import build
    from llava_core.model.lora import apply_lora

    model, _ = build.assemble("llava_next", tiny_dataset["vision"], tiny_dataset["llm"])
    with pytest.raises(ValueError, match="not modules"):
        apply_lora(model, LORA, [model.model.multi_modal_projector, model.model.image_newline])


def test_official_projector_is_imported_with_its_weights(tiny_dataset, tmp_path):
    model, _ = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    projector = model.model.multi_modal_projector
    g = torch.Generator().manual_seed(3)
    official = {
        "model.mm_projector.0.weight": torch.randn(projector.linear_1.weight.shape, generator=g),
        "model.mm_projector.0.bias": torch.randn(projector.linear_1.bias.shape, generator=g),
        "model.mm_projector.2.weight": torch.randn(projector.linear_2.weight.shape, generator=g),
        "model.mm_projector.2.bias": torch.randn(projector.linear_2.bias.shape, generator=g),
    }
    path = str(tmp_path / "mm_projector.bin")
    torch.save(official, path)
    load_official_projector(model, path)
    assert torch.equal(projector.linear_1.weight, official["model.mm_projector.0.weight"])
    assert torch.equal(projector.linear_2.bias, official["model.mm_projector.2.bias"])

    torch.save({"model.mm_projector.weight": official["model.mm_projector.0.weight"]}, path)  # LLaVA-1.0 linear
    with pytest.raises(ValueError, match="mm_projector.0/2"):
        load_official_projector(model, path)


@pytest.mark.parametrize("settings, message", [
    ({"zero_stage": 4}, "zero_stage"),
    ({"offload_params": True}, "needs zero_stage 3"),
    ({"lora": {"r": 8}, "trainable": ["projector"]}, "add 'llm'"),
    ({"lora": {"target_modules": ["lm_head"]}}, "target_modules"),
    ({"sampling": "by_length"}, "sampling"),
    ({"init_projector": "mm_projector.bin"}, "align trains the projector from scratch"),
])
def test_bad_training_settings_are_rejected_before_anything_runs(settings, message):
    from llava_core.config import WorkflowError, workflow_from_dict

    data = {"datasets": {"align": {"path": "a.json"}, "instruct": {"path": "b.json"}},
            "align": {"dataset": "align", "global_batch_size": 32, "micro_batch_size": 16, **settings}}
    if "lora" in settings and "trainable" not in settings:
        data["align"]["trainable"] = ["projector", "llm"]
    with pytest.raises(WorkflowError, match=message):
        workflow_from_dict(data)


def test_llava_15_lora_settings_are_accepted():
    from llava_core.config import workflow_from_dict

    w = workflow_from_dict({"datasets": {"align": {"path": "a.json"}, "instruct": {"path": "b.json"}},
                            "instruct": {"dataset": "instruct", "trainable": ["projector", "llm"], "lora": {},
                                         "lr": 2e-4, "projector_lr": 2e-5,
                                         "zero_stage": 3, "offload_params": True, "offload_optimizer": True,
                                         "sampling": "modality_grouped", "init_projector": "mm_projector.bin"}})
    assert (w.instruct.lora.r, w.instruct.lora.alpha, len(w.instruct.lora.target_modules)) == (128, 256, 7)
