"""The export stage: the trained model as a plain Hugging Face LLaVA checkpoint.

The instruct stage already writes its model as a complete HF checkpoint (safetensors in the dtype it trained in,
processor, chat template, greedy generation defaults), so exporting is a copy: nothing is loaded, nothing is
converted, and the copy runs as a Ray task on a worker, never in the driver (a 13B model is 26 GB in bf16, the head
pod has 16 GiB). The directory loads with `LlavaForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained`, no import of this project needed. A LoRA run's adapter is copied beside it.
"""
from __future__ import annotations

import json
import math
import struct

from llava_core import storage


def export_hf(instruct_dir: str, export_dir: str) -> dict:
    """Copy `<instruct_dir>/model` (and `adapter/` when LoRA trained) to `export_dir` on a Ray worker."""
    import ray

    copy = ray.remote(num_cpus=1)(copy_export).options(runtime_env={"env_vars": storage.s3_env()})
    return ray.get(copy.remote(storage.absolute(instruct_dir), storage.absolute(export_dir)))


def copy_export(instruct_dir: str, export_dir: str) -> dict:
    storage.delete_dir(export_dir)
    storage.copy_dir(storage.join(instruct_dir, "model"), export_dir)
    metrics = {"files": sorted(name for name, _, _ in storage.listing(export_dir))}
    adapter = storage.join(instruct_dir, "adapter")
    if storage.exists(storage.join(adapter, "adapter_config.json")):  # LoRA: the adapter alone, beside the merge
        storage.copy_dir(adapter, storage.join(export_dir, "adapter"))
        metrics["adapter"] = storage.join(export_dir, "adapter")
    config = storage.read_json(storage.join(export_dir, "config.json"))
    weights = [storage.join(export_dir, f) for f in metrics["files"] if f.endswith(".safetensors")]
    return {**metrics, "parameters": sum(safetensors_parameters(w) for w in weights),
            "dtype": config.get("dtype") or config.get("torch_dtype"), "family": config["model_type"],
            "image_seq_length": config.get("image_seq_length")}


def safetensors_parameters(path: str) -> int:
    """Parameters in a safetensors file, from its JSON header alone (the first bytes), not its tensors."""
    fs, inner = storage.filesystem(path)
    with fs.open_input_file(inner) as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    return sum(math.prod(tensor["shape"]) for name, tensor in header.items() if name != "__metadata__")
