"""One LLaVA-1.5 stage-2 training step on a GPU: Vicuna-7B-shaped LLM + CLIP ViT-L/336-shaped tower, random weights.

Nothing is downloaded: both models are built from configs (LlamaConfig: 4096 wide, 32 layers, 11008 MLP; CLIP:
1024 wide, 24 layers, 336 px, patch 14 -> 576 image tokens). transformers' LlavaForConditionalGeneration with the
project's freezing (projector + LLM train, vision frozen), packing (BatchPlan, rows of --pack-length tokens) and
collation (collate_packed), bf16, SDPA (or --attn flash_attention_2), gradient checkpointing, AdamW with clipping.
Sample lengths follow LLaVA-1.5's mix (benchmarks/padding.py). MFU counts 6N per token for trained parts, 2N for the
frozen tower (llava_core.flops), attention scores excluded. One GPU holds no fp32 AdamW state for 7B:
the optimizer keeps its state in bf16 (the parameters' dtype); a ZeRO cluster run keeps fp32 state sharded.

    python benchmarks/gpu_step.py                  # on a GPU
    python benchmarks/gpu_step.py --tiny           # the same code on CPU with tiny shapes
Last line: {"device": ..., "step_s": ..., "tokens_per_s": ..., "mfu": ...}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, os.path.dirname(__file__))

from llava_core.train.batching import BatchPlan, collate_packed  # noqa: E402
from llava_core.train.freeze import apply_stage_training  # noqa: E402
from llava_core.train.metrics import flops_counter, peak_flops  # noqa: E402


def llava_config(tiny: bool) -> LlavaConfig:
    if tiny:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=64, patch_size=8)
        text = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=1024, max_position_embeddings=2048)
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu")
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size - 64,
                       image_seq_length=(vision.image_size // vision.patch_size) ** 2, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def sample_rows(config: LlavaConfig, rows: int, max_length: int, seed: int = 0) -> pa.Table:
    """Token rows with LLaVA-1.5-mix lengths (image tokens included); answers are the supervised last third."""
    from padding import llava_mix_lengths

    rng = np.random.default_rng(seed)
    lengths, num_images = llava_mix_lengths(rows, seed)
    image_tokens = config.image_seq_length
    side = config.vision_config.image_size
    table = {"input_ids": [], "labels": [], "pixel_values": [], "num_images": [], "length": []}
    for length, images in zip(lengths, num_images):
        text_len = max(8, min(int(length) - 576 * images, max_length - image_tokens * images))
        text = rng.integers(10, config.text_config.vocab_size - 100, size=text_len).tolist()
        ids = text[:4] + [config.image_token_index] * image_tokens * images + text[4:]
        labels = [-100] * (len(ids) - text_len // 3) + ids[len(ids) - text_len // 3:]
        pixels = rng.standard_normal((3, side, side), dtype=np.float32).tobytes() if images else b""
        for key, value in (("input_ids", ids), ("labels", labels), ("pixel_values", pixels),
                           ("num_images", int(images)), ("length", len(ids))):
            table[key].append(value)
    return pa.table(table)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the script, not a GPU")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows-per-micro", type=int, default=2)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--pack-length", type=int, default=0, help="default: 4096 (512 with --tiny)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    parser.add_argument("--layers", type=int, default=0, help="fewer LLM layers, when memory is short")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    pack_length = args.pack_length or (512 if args.tiny else 4096)
    config = llava_config(args.tiny)
    if args.layers:
        config.text_config.num_hidden_layers = args.layers

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    torch.set_default_dtype(previous)
    model.set_attn_implementation(args.attn)
    model = apply_stage_training(model, ["projector", "llm"], None)  # LLaVA-1.5 stage 2
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5,
                                  fused=device.type == "cuda")
    flops = flops_counter(model, ["projector", "llm"], lora=False)

    plan = BatchPlan(1, args.rows_per_micro, args.accum, seed=0, packing=True, pack_length=pack_length)
    samples_needed = int(args.steps * args.accum * args.rows_per_micro * pack_length / 500) + 64
    table = sample_rows(config, samples_needed, pack_length)
    lengths = table.column("length").to_numpy()
    num_images = table.column("num_images").to_numpy()
    image_shape = (3, config.vision_config.image_size, config.vision_config.image_size)
    available = plan.steps_in_epoch(lengths, num_images, 0)
    if available < args.steps:
        raise SystemExit(f"only {available} packed steps planned; raise the sample count")

    times, tokens, step_flops = [], [], []
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started, step_tokens, flop = time.time(), 0, 0.0
        for micro in plan.micro_batches(lengths, num_images, 0, step, 0):
            batch = collate_packed(table, micro, pad_token_id=0, image_shape=image_shape)
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            loss = model(**batch, use_cache=False).loss / args.accum
            loss.backward()
            rows = np.concatenate(micro)
            step_tokens += int(lengths[rows].sum())
            flop += flops(int(lengths[rows].sum()), int(num_images[rows].sum()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - started)
        tokens.append(step_tokens)
        step_flops.append(flop)
        print(f"step {step + 1}/{args.steps}: {times[-1]:.3f}s, {step_tokens} tokens, loss {float(loss) * args.accum:.3f}",
              flush=True)

    measured = slice(args.warmup, None)
    step_s = float(np.mean(times[measured]))
    tokens_per_s = float(np.sum(tokens[measured]) / np.sum(times[measured]))
    peak = peak_flops(None, device.type == "cuda")
    mfu = None if peak is None else float(np.sum(step_flops[measured]) / np.sum(times[measured]) / peak)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (--tiny)"
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(json.dumps({"device": name, "step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1),
                      "mfu": None if mfu is None else round(mfu, 4)}))


if __name__ == "__main__":
    main()
