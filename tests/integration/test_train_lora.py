"""A LoRA stage trained, merged into a plain HF checkpoint and exported loads back with the peft model's logits (what
trains, without Ray: tests/unit/test_train_lora.py)."""
import os

import torch
from transformers import LlavaForConditionalGeneration

from llava_core.model.build import assemble
from llava_core.train.freeze import apply_stage_training
from tests.train_lora_helpers import LORA, assert_same_weights, tiny_batch


def test_lora_train_merge_export_load_gives_the_peft_logits(tiny_dataset, tmp_path, ray_session):

    from llava_core.model.export import export_hf
    from llava_core.train.save import save_hf_model

    torch.manual_seed(0)
    model, processor = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    base_dir = str(tmp_path / "base")
    model.save_pretrained(base_dir)  # what the instruct stage starts from (the align output)
    processor.save_pretrained(base_dir)
    model = apply_stage_training(model, ["projector", "llm"], LORA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny_batch(model.get_base_model(), processor)
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        peft_logits = model(**batch).logits

    stage_out = tmp_path / "instruct"
    save_hf_model(model, processor, str(stage_out / "model"), torch.float32)  # the stage output, adapter beside it
    files = set(os.listdir(stage_out / "adapter"))
    assert files == {"adapter_config.json", "adapter_model.safetensors", "README.md"}  # peft's own, no side file
    metrics = export_hf(str(stage_out), str(tmp_path / "export"))
    assert set(os.listdir(tmp_path / "export" / "adapter")) == files

    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    assert metrics["parameters"] == sum(p.numel() for p in merged.parameters())  # counted from the file headers
    trained_projector = model.get_base_model().model.multi_modal_projector.modules_to_save["default"]
    assert_same_weights(merged.model.multi_modal_projector, trained_projector)
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    assert torch.allclose(merged_logits, peft_logits, atol=1e-4)
