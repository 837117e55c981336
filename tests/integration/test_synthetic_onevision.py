"""The SigLIP + Qwen2 stand-ins that ensure_synthetic writes for the LLaVA-OneVision quickstart are pretrained and load
as a OneVision model (the data itself: tests/unit/test_synthetic_onevision.py)."""
import json

import torch
from PIL import Image

from llava_core.model import build
from llava_core.quickstart import synthetic_onevision as ov


def test_ensure_synthetic_writes_onevision_stand_ins_that_assemble(tmp_path, capsys):
    from llava_core.config import ModelSettings, SyntheticSettings, TinyModelSettings, Workflow
    from llava_core.quickstart.bootstrap import ensure_synthetic

    model = ModelSettings(family="llava_onevision", vision_tower=str(tmp_path / "models/vision"),
                          llm=str(tmp_path / "models/llm"))
    w = Workflow(model=model, synthetic=SyntheticSettings(
        root=str(tmp_path), align_rows=8, instruct_rows=16, eval_questions=4, text_only_rows=3, seed=5,
        tiny_model=TinyModelSettings(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, llm_hidden=32,
                                     llm_layers=1, llm_heads=2, vocab_size=300, tower_pretraining_steps=20)))
    ensure_synthetic(w)
    assert "[vision tower] step 20/20" in capsys.readouterr().out
    assert json.load(open(tmp_path / "models/vision/config.json"))["architectures"] == ["SiglipModel"]
    assert json.load(open(tmp_path / "models/llm/config.json"))["architectures"] == ["Qwen2ForCausalLM"]
    assert json.load(open(tmp_path / "instruct.json"))[0]["id"]  # the OneVision dataset, not the shapes one
    assert Image.open(tmp_path / "images/eval_000000.png").size in ov.CANVASES

    model, processor = build.assemble("llava_onevision", w.model.vision_tower, w.model.llm)
    assert processor._get_num_multimodal_tokens(image_sizes=[(96, 96)])["num_image_tokens"] == [172]
    image = Image.open(tmp_path / "images/eval_000000.png")
    inputs = processor(images=[image], text=["<image>\nWhat colour is the small dot?"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1] and torch.isfinite(logits).all()
    ensure_synthetic(w)  # finished: the marker's hash matches, nothing is written again
    assert "creating" not in capsys.readouterr().out
