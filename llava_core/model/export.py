"""The export stage: the trained model as a plain Hugging Face LLaVA checkpoint.

The directory loads with `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`, no
import of this project needed, and carries the chat template the model was trained with.
"""
from __future__ import annotations

import os
import tempfile

from llava_core import storage
from llava_core.model.build import load_llava


def export_hf(model_dir: str, export_dir: str, cache_root: str) -> dict:
    """Load the instruct stage's model, save it in safetensors with processor and generation defaults."""
    model, processor = load_llava(storage.local_copy(model_dir, cache_root))
    model.generation_config.do_sample = False  # LLaVA evaluates greedily; clients can still ask for sampling
    model.generation_config.max_new_tokens = 64
    with tempfile.TemporaryDirectory() as local:
        model.save_pretrained(local, safe_serialization=True)
        processor.save_pretrained(local)
        storage.delete_dir(export_dir)
        storage.copy_dir(local, export_dir)
        files = sorted(os.listdir(local))
    return {"files": files, "parameters": sum(p.numel() for p in model.parameters()),
            "image_seq_length": model.config.image_seq_length}
