"""Create the quickstart's synthetic dataset and tiny base models, again whenever their settings change."""
from __future__ import annotations

import json
import os

from llava_core.config import settings_hash
from llava_core.data import synthetic
from llava_core.model import tiny


def ensure_synthetic(workflow) -> None:
    s = workflow.synthetic
    marker = os.path.join(s.root, ".complete")
    wanted = settings_hash(s, workflow.model, synthetic.GENERATOR_VERSION)
    if os.path.exists(marker) and json.load(open(marker)).get("hash") == wanted:
        return
    print(f"creating the synthetic dataset and tiny base models in {s.root}", flush=True)
    paths = synthetic.generate(s.root, s.align_rows, s.instruct_rows, s.eval_questions, s.text_only_rows, s.seed)
    rows = json.load(open(paths["align"])) + json.load(open(paths["instruct"]))
    corpus = [turn["value"] for row in rows for turn in row["conversations"]]
    model_cfg = tiny.TinyModelConfig(**s.tiny_model.__dict__, seed=s.seed)
    tiny.save_tiny_models(workflow.model.vision_tower, workflow.model.llm, corpus, model_cfg)
    with open(marker, "w") as f:
        json.dump({"hash": wanted}, f)
