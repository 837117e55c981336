"""A training stage's weights on disk: the whole model as a plain HF checkpoint, written module by module.

Under ZeRO-3 each rank holds 1/world of every parameter. The weights are gathered one module at a time (every rank
takes part in each gather, in the same order), and rank 0 writes each gathered tensor straight into its safetensors
shard and drops it. The header of a safetensors file (names, dtypes, shapes, offsets) is known before any value, so
a shard is written tensor by tensor; safetensors' own `save_file` needs all of a shard's tensors in memory at once.
Peak memory is one module on the device and one tensor on the host, instead of the whole model gathered and cloned
on rank 0's GPU (~78 GB for 13B). LoRA is merged per layer (base weight + peft's delta) without touching the model.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Callable

import torch

from llava_core.model.lora import is_kept_original, is_peft, llava_of, plain_name, trained_module
from llava_core.model.processors import SOURCE_TOKENIZER_CLASS
from llava_core.model.zero3 import full_shape, gathered

MAX_SHARD_BYTES = 5 * 2**30  # as transformers' save_pretrained used to: 7B in bf16 is 3 shards
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}


@dataclass
class Entry:
    """One tensor of the saved checkpoint: its key, shape and dtype (known before gathering), the parameters to
    gather for it and how to compute it from them."""
    key: str
    shape: tuple
    dtype: torch.dtype
    gather: list
    value: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# transformers 5.2x names a LLaVA model's weights `model.vision_tower.embeddings.*`, `model.language_model.*`,
# `lm_head.*` in memory and writes them so; the hub's checkpoints, vLLM, SGLang and transformers 4.x read
# `vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.*`, `multi_modal_projector.*`,
# `image_newline` (transformers 5.x reads that layout too, through its conversion mapping). The same for all three
# families and both towers (CLIP, SigLIP); a name already in the hub's form is left as it is.
HUB_KEY_LAYOUT = (
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^model\.vision_tower\.(?!vision_model\.)"), "vision_tower.vision_model."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^model\.image_newline$"), "image_newline"),
)


def hub_key(name: str) -> str:
    """A parameter's name as the hub's checkpoints of its family spell it."""
    for pattern, replacement in HUB_KEY_LAYOUT:
        renamed = pattern.sub(replacement, name, count=1)
        if renamed != name:
            return renamed
    return name


def checkpoint_entries(model, dtype: torch.dtype) -> list[Entry]:
    """The tensors of a plain LlavaForConditionalGeneration checkpoint, in module order, under the hub's names
    (`hub_key`), with LoRA merged in and peft's modules_to_save copies under the plain names. Floating tensors are
    written in `dtype`; tied weights once."""
    base = llava_of(model)
    wanted = {plain_name(k) for k in base.state_dict() if "lora_" not in k and not is_kept_original(k)}
    entries, seen = [], set()

    def add(key, tensor, gather, value):
        if key in wanted and id(tensor) not in seen:
            seen.add(id(tensor))
            saved_dtype = dtype if tensor.is_floating_point() else tensor.dtype
            entries.append(Entry(hub_key(key), full_shape(tensor), saved_dtype, gather, value))

    for name, module in plain_modules(base):
        prefix = f"{name}." if name else ""
        if is_lora_layer(module):
            params = list(module.parameters())
            add(prefix + "weight", module.base_layer.weight, params, lambda m=module: merged_weight(m))
            if module.base_layer.bias is not None:
                bias = module.base_layer.bias
                add(prefix + "bias", bias, [bias], lambda b=bias: b)
            continue
        for pname, param in module.named_parameters(recurse=False):
            add(prefix + pname, param, [param], lambda p=param: p)
        for bname, buffer in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                add(prefix + bname, buffer, [], lambda b=buffer: b)
    return entries


def is_lora_layer(module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")


def plain_modules(module, name: str = ""):
    """(name, module) in module order as the plain model has them: a modules_to_save wrapper stands for its trained
    copy; a LoRA layer is yielded alone (its base layer and adapters are written merged with it)."""
    module = trained_module(module)
    yield name, module
    if is_lora_layer(module):
        return
    for child_name, child in module.named_children():
        yield from plain_modules(child, f"{name}.{child_name}" if name else child_name)


def merged_weight(lora_layer) -> torch.Tensor:
    """A LoRA layer's base weight plus its active adapters' deltas (peft's own arithmetic, fan-in/out and scaling
    included), computed on gathered values, the model untouched."""
    weight = lora_layer.base_layer.weight.detach().clone()
    for adapter in lora_layer.active_adapters:
        if adapter in lora_layer.lora_A:
            weight += lora_layer.get_delta_weight(adapter).to(weight.dtype)
    return weight


def shard_plan(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    shards, size = [[]], 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(entries: list[Entry]) -> bytes:
    """The file's length-prefixed JSON header, padded with spaces to 8 bytes as safetensors' writer pads it."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for entry in entries:
        header[entry.key] = {"dtype": SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape),
                             "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def tensor_bytes(tensor: torch.Tensor, dtype: torch.dtype) -> memoryview:
    flat = tensor.detach().to("cpu", dtype).contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_weights(model, directory: str, dtype: torch.dtype, writer: bool,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Every rank calls this (ZeRO-3 gathers need all of them); only the `writer` rank writes files."""
    shards = shard_plan(checkpoint_entries(model, dtype), max_shard_bytes)
    names = shard_names(len(shards))
    for name, entries in zip(names, shards):
        with open(os.path.join(directory, name), "wb") if writer else contextlib.nullcontext() as f:
            if writer:
                f.write(safetensors_header(entries))
            for entry in entries:
                with gathered(entry.gather), torch.no_grad():
                    value = entry.value()
                    if writer:
                        f.write(tensor_bytes(value, entry.dtype))
                del value
    if writer and len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for s in shards for e in s)},
                 "weight_map": {e.key: name for name, s in zip(names, shards) for e in s}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def save_hf_model(model, processor, directory: str, dtype: torch.dtype, writer: bool = True) -> None:
    """The whole model as a plain HF LLaVA checkpoint (safetensors shards in `dtype`, LoRA merged), its config,
    greedy generation defaults and the processor. Called by every rank under ZeRO-3; `writer` (global rank 0)
    writes. With LoRA the adapter alone goes to `<directory>/../adapter` too."""
    from llava_core.model.lora import save_adapter

    base = llava_of(model)
    if writer:
        os.makedirs(directory, exist_ok=True)
    write_weights(model, directory, dtype, writer)
    if is_peft(model):
        trained = [p for p in model.parameters() if p.requires_grad]  # adapters and modules_to_save: small
        with gathered(trained):
            if writer:
                save_adapter(model, os.path.join(os.path.dirname(directory), "adapter"))
    if not writer:
        return
    for config in (base.config, base.config.text_config, base.config.vision_config):
        config.dtype = dtype  # what from_pretrained loads by default: the export says how it trained
    base.config.architectures = [type(base).__name__]
    base.config.save_pretrained(directory)
    base.generation_config.do_sample = False  # LLaVA evaluates greedily; clients can still ask for sampling
    # No answer length: engines take this file's values as their request defaults (vLLM's max_tokens), and a length
    # here would cut every answer that asks for none. Our endpoint has its own default (serve.default_max_tokens).
    base.generation_config.max_new_tokens = None
    base.generation_config.save_pretrained(directory)
    processor.save_pretrained(directory)
    write_portable_tokenizer_config(directory, processor)


def write_portable_tokenizer_config(directory: str, processor) -> None:
    """tokenizer_config.json as transformers 4.x reads it too: transformers 5 lists the added special tokens as
    `extra_special_tokens`, which 4.x takes for a mapping (and fails on); both read `additional_special_tokens`. A
    model loaded and saved again keeps the tokenizer class its directory named (`processors.load_processor`). The
    processor it names is the one processor_config.json names (OneVision's image-only stand-in saves as
    transformers' LlavaOnevisionProcessor)."""
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    source_class = getattr(processor.tokenizer, SOURCE_TOKENIZER_CLASS, None)
    if config.get("tokenizer_class") == "TokenizersBackend" and source_class:
        config["tokenizer_class"] = source_class  # a loaded model saved again: the class its directory named
    config["processor_class"] = processor.to_dict()["processor_class"]
    with open(path, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
