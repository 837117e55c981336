"""The project's training step on one GPU: Vicuna-7B-shaped LLM + CLIP ViT-L/336-shaped tower, random weights,
driven by the project's own loop pieces without Ray (the GPU machine has none).

Nothing is downloaded: both models are built from configs (LlamaConfig: 4096 wide, 32 layers, 11008 MLP, 32064
rows of embeddings; CLIP: 1024 wide, 24 layers, 336 px, patch 14 -> 576 image tokens) straight on the device in
bf16. What runs is the worker loop's: `train.engine.build_engine` (DeepSpeed ZeRO-2 on one rank, bf16, the stage's
freezing: projector + LLM train, vision frozen, gradient checkpointing, fused AdamW, the cosine schedule), rows
written as a prepared shard (8-row groups) and streamed by `train.streaming.BatchPrefetcher` with the batch plan's
packing (rows of --pack-length tokens), `train.engine.model_inputs` (packed rows flattened for flash attention's
variable-length path), `train.engine.optimizer_step` (token-normalised loss, `train/loss.py`), and with --save a
DeepSpeed checkpoint at the end, timed after the step figures are printed. Sample lengths follow LLaVA-1.5's mix
(benchmarks/padding.py). MFU counts model FLOPs (llava_core.flops, the plan's count: 6N per token trained, the lm_head
on supervised tokens, 2N per patch for the frozen tower, attention included, no recomputation) against the device's
dense bf16 peak.

Memory: the whole 7B with fp32 AdamW state and fp32 gradients on one GPU needs ~125 GB before activations. By default
the LLM keeps as many of its 32 layers as the GPU holds (all on 141 GB H200s, 16 on 80 GB H100s: 7B width, half the
depth; MFU per layer is what the full model runs at); the output names the layer count. Takes ~2-4 minutes.

    python benchmarks/gpu_step.py [--attn sdpa] [--layers 32] [--save]   # on a GPU (flash attention when installed)
    python benchmarks/gpu_step.py --tiny                                  # the same code on CPU with tiny shapes
    python benchmarks/gpu_step.py --smoke                     # --tiny, 3 steps after 1 of warm-up: seconds
Last line: {"device", "llm_layers", "attn", "steps", "warmup", "step_s", "tokens_per_s", "mfu", "peak_mem_gib"} (a
further line with "checkpoint_s" after it with --save). --smoke (benchmarks/harness.py) checks the script on CPU;
the GPU run is the one without --tiny or --smoke.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import harness
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, os.path.dirname(__file__))

from llava_core.config import TrainStageSettings  # noqa: E402
from llava_core.data.image_layouts import CropPixels  # noqa: E402
from llava_core.data.rows import ROW_GROUP_ROWS  # noqa: E402
from llava_core.plan import llama_linears  # noqa: E402
from llava_core.train.batching import BatchPlan  # noqa: E402
from llava_core.train.engine import build_engine, model_inputs, optimizer_step, supervised_tokens  # noqa: E402
from llava_core.train.metrics import flops_counter, micro_batch_flops, peak_flops  # noqa: E402
from llava_core.train.streaming import BatchPrefetcher, TrainingRows  # noqa: E402


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


def write_rows(config: LlavaConfig, rows: int, max_length: int, path: str, seed: int = 0) -> str:
    """A shard in the prepare stage's layout with LLaVA-1.5-mix lengths (image tokens included); answers are the
    supervised last third."""
    from padding import llava_mix_lengths

    rng = np.random.default_rng(seed)
    lengths, num_images = llava_mix_lengths(rows, seed)
    image_tokens = config.image_seq_length
    side = config.vision_config.image_size
    table = {"input_ids": [], "labels": [], "pixel_values": [], "num_images": [], "length": []}
    for length, images in zip(lengths, num_images):
        text_len = max(8, min(int(length) - image_tokens * images, max_length - image_tokens * images))
        text = rng.integers(10, config.text_config.vocab_size - 100, size=text_len).tolist()
        ids = text[:4] + [config.image_token_index] * image_tokens * images + text[4:]
        labels = [-100] * (len(ids) - text_len // 3) + ids[len(ids) - text_len // 3:]
        crop = rng.integers(0, 256, (3, side, side), dtype=np.uint8).tobytes() if images else b""
        pixels = {"uint8": crop, "scale": [2 / 255] * 3, "offset": [-1.0] * 3}
        for key, value in (("input_ids", ids), ("labels", labels), ("pixel_values", pixels),
                           ("num_images", int(images)), ("length", len(ids))):
            table[key].append(value)
    pq.write_table(pa.table(table), path, row_group_size=ROW_GROUP_ROWS)
    return path


def default_layers(config: LlavaConfig, device: torch.device) -> int:
    """All the LLM's layers where ~18 bytes a parameter (bf16 weights, fp32 gradients, fp32 Adam master and moments)
    leave an eighth of the GPU for activations (~2.5 GB at 2 packed rows of 4096); else the most that do, in steps
    of 4: 16 on an 80 GB H100 (~69 GB of state), 32 on a 141 GB H200."""
    layers = config.text_config.num_hidden_layers
    if device.type != "cuda":
        return layers
    text = config.text_config
    per_layer = sum(i * o for i, o in llama_linears(text.to_dict()).values())
    fixed = 2 * text.vocab_size * text.hidden_size + 330e6  # embeddings, lm_head, the tower and projector
    budget = 0.88 * torch.cuda.get_device_properties(device).total_memory / 18
    fits = int((budget - fixed) // per_layer) // 4 * 4
    return max(4, min(layers, fits))


def default_attention(use_gpu: bool) -> str:
    import importlib.util

    return "flash_attention_2" if use_gpu and importlib.util.find_spec("flash_attn") else "sdpa"


def one_rank_group(device: torch.device) -> None:
    """A world of one, as torchrun would set it up: DeepSpeed wants an initialised process group and LOCAL_RANK."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the script, not a GPU")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows-per-micro", type=int, default=2)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--pack-length", type=int, default=0, help="default: 4096 (512 with --tiny)")
    parser.add_argument("--attn", default="", choices=["", "sdpa", "flash_attention_2", "eager"],
                        help="default: flash_attention_2 on a GPU where flash-attn is installed, else sdpa")
    parser.add_argument("--layers", type=int, default=0, help="LLM layers (default: what the GPU's memory holds)")
    parser.add_argument("--save", action="store_true", help="also time a DeepSpeed checkpoint (~49 GB at 16 layers)")
    args = harness.parse_args(parser, smoke={"tiny": True, "steps": 3, "warmup": 1})
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    use_gpu = device.type == "cuda"
    pack_length = args.pack_length or (512 if args.tiny else 4096)
    config = llava_config(args.tiny)
    config.text_config.num_hidden_layers = args.layers or default_layers(config, device)
    args.attn = args.attn or default_attention(use_gpu)
    config._attn_implementation = args.attn
    one_rank_group(device)
    total_steps = args.steps
    stage = TrainStageSettings(
        trainable=["projector", "llm"], global_batch_size=args.rows_per_micro * args.accum,
        micro_batch_size=args.rows_per_micro, lr=2e-5, zero_stage=2, gradient_checkpointing=True, packing=True,
        pack_length=pack_length, attn_implementation=args.attn)

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if use_gpu else torch.float32)  # the worker loop's training dtype
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    torch.set_default_dtype(previous)
    engine, _, _ = build_engine(model, stage, 1, total_steps, use_gpu, device)
    flops = flops_counter(engine.module, stage.trainable, lora=False)

    with tempfile.TemporaryDirectory() as root:
        plan = BatchPlan(1, args.rows_per_micro, args.accum, seed=0, packing=True, pack_length=pack_length)
        samples_needed = int(args.steps * args.accum * args.rows_per_micro * pack_length / 500) + 64
        rows = TrainingRows.open([write_rows(config, samples_needed, pack_length, os.path.join(root, "rows.parquet"))])
        epoch_steps = [plan.steps_in_epoch(rows.lengths, rows.num_images, 0)]
        if epoch_steps[0] < args.steps:
            raise SystemExit(f"only {epoch_steps[0]} packed steps planned; raise the sample count")
        side = config.vision_config.image_size
        pixels = CropPixels((3, side, side), config.image_seq_length)
        batches = BatchPrefetcher(rows, plan.rank_micro_batches(rows.lengths, rows.num_images, epoch_steps, 0, 0),
                                  True, 0, pixels)
        flatten = args.attn == "flash_attention_2"
        times, tokens, step_flops = [], [], []
        for step in range(args.steps):
            step_batches, step_tokens, flop = [], 0, 0.0
            for _ in range(args.accum):
                micro, batch, _ = batches.get()
                step_batches.append(model_inputs(batch, config.image_token_index, pixels, 0, flatten))
                picked = np.concatenate(micro)
                step_tokens += int(rows.lengths[picked].sum())
                flop += micro_batch_flops(flops, rows.lengths[picked], int(rows.num_images[picked].sum()),
                                          supervised_tokens(batch))
            if use_gpu:
                torch.cuda.synchronize()
            started = time.time()
            numerator, denominator = optimizer_step(engine, step_batches, "token", device)
            loss = float(numerator / denominator)  # a host sync, as the worker loop's metrics make one
            times.append(time.time() - started)
            tokens.append(step_tokens)
            step_flops.append(flop)
            print(f"step {step + 1}/{args.steps}: {times[-1]:.3f}s, {step_tokens} tokens, loss {loss:.3f}", flush=True)
        batches.close()
        measured = slice(args.warmup, None)
        peak = peak_flops(None, use_gpu)
        mfu = None if peak is None else float(np.sum(step_flops[measured]) / np.sum(times[measured]) / peak)
        harness.print_summary({
            "device": torch.cuda.get_device_name() if use_gpu else "cpu (--tiny)",
            "llm_layers": config.text_config.num_hidden_layers, "attn": args.attn, "steps": args.steps,
            "warmup": args.warmup,
            "step_s": round(float(np.mean(times[measured])), 4),
            "tokens_per_s": round(float(np.sum(tokens[measured]) / np.sum(times[measured])), 1),
            "mfu": None if mfu is None else round(mfu, 4),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if use_gpu else None})
        if args.save:
            started = time.time()
            engine.save_checkpoint(os.path.join(root, "checkpoint"), tag="deepspeed", exclude_frozen_parameters=True)
            harness.print_summary({"checkpoint_s": round(time.time() - started, 2)})

if __name__ == "__main__":
    main()
