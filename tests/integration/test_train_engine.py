"""The training engine as the worker loop drives it (build_model, build_engine, optimizer_step), run by real DeepSpeed
in 1 or 2 CPU processes over gloo, without Ray Train (the loop's Ray side has its own tests): the model trains in
train mode (gradient checkpointing really recomputes, LoRA dropout is active), the schedule, the LoRA recipe in bf16
with gradients accumulated in fp32, and a text-only micro-batch beside image ones under ZeRO-3.

The longer runs (token-normalised gradients, ZeRO-3's memory and saved weights): tests/end_to_end/test_train_engine.py.
"""
from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llava_core.config import LoraSettings
from tests.ports import free_port
from tests.train_engine_helpers import batch_of, build, samples, stage_settings


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group for DeepSpeed in this process (kept: DeepSpeed engines hold on to it)."""
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed wants it, as torchrun and Ray Train set it
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield


def test_gradient_checkpointing_recomputes_the_decoder_layers_it_is_asked_to(tiny_dataset, one_rank):
    from llava_core.model.lora import llava_of
    from llava_core.train.engine import optimizer_step

    calls, weights = {}, {}
    for checkpointing, every in ((False, 1), (True, 1), (True, 2)):
        engine, _ = build(tiny_dataset, stage_settings(gradient_checkpointing=checkpointing, recompute_every=every,
                                                   micro_batch_size=2, global_batch_size=2))
        assert engine.module.training
        # transformers checkpoints a decoder layer's `forward` (its own hooks stay outside): count calls of a module
        # inside it, as they start (torch stops a recomputation once it has every saved tensor back).
        layers = llava_of(engine.module).model.language_model.layers
        count = [[] for _ in layers]
        handles = [layer.mlp.register_forward_pre_hook(lambda *_, n=n: n.append(1)) for layer, n in zip(layers, count)]
        optimizer_step(engine, [batch_of(samples(engine, 2))], "token", torch.device("cpu"))
        for handle in handles:
            handle.remove()
        calls[checkpointing, every] = [len(n) for n in count]
        weights[checkpointing, every] = layers[-1].mlp.down_proj.weight.detach().clone()
    # once forward; recomputed: once more in backward. Every 2nd of the LLM's 2 layers is its first (counted over the
    # whole model, after the tower's 3 layers, it would be the second).
    assert calls == {(False, 1): [1, 1], (True, 1): [2, 2], (True, 2): [2, 1]}
    assert torch.allclose(weights[True, 1], weights[False, 1]) and torch.allclose(weights[True, 2], weights[False, 1])


def test_deepspeed_on_cpu_starts_without_compiling_its_inference_all_reduce(tiny_dataset, one_rank):
    import deepspeed.comm.comm as ds_comm

    build(tiny_dataset, stage_settings())
    # DeepSpeed's CPU backend would JIT-build `deepspeed_shm_comm` here (~25 s on a new install path); training's
    # collectives never call it
    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None


def test_the_schedule_is_transformers_cosine_with_hf_trainers_warmup_steps(tiny_dataset, one_rank):
    engine, _ = build(tiny_dataset, stage_settings(warmup_ratio=0.03, lr=1e-3), total_steps=100)
    scheduler = engine.lr_scheduler
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
    # ceil(0.03 x 100) = 3 warmup steps from 0, the peak, then half a cosine to 0
    assert [round(lr / 1e-3, 3) for lr in lrs[:4]] == [0.0, 0.333, 0.667, 1.0]
    assert lrs[51] == pytest.approx(0.5e-3, rel=0.02) and lrs[99] < 1e-6


def test_lora_dropout_is_active_while_training(tiny_dataset, one_rank):
    stage = stage_settings(lora=LoraSettings(r=4, alpha=8, dropout=0.5), micro_batch_size=2, global_batch_size=2)
    engine, _ = build(tiny_dataset, stage)
    batch = batch_of(samples(engine, 2))
    dropouts = [m for n, m in engine.module.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Dropout) and m.training for m in dropouts)
    seen = []
    hook = dropouts[0].register_forward_hook(lambda m, i, o: seen.append((i[0].clone(), o.clone())))
    with torch.no_grad():
        engine(**batch, use_cache=False)
        engine.eval()  # what evaluation code does for itself
        engine(**batch, use_cache=False)
    hook.remove()
    (train_in, train_out), (eval_in, eval_out) = seen
    zeroed = float(((train_out == 0) & (train_in != 0)).float().sum() / (train_in != 0).float().sum())
    assert 0.4 < zeroed < 0.6  # about half of the adapter's inputs dropped while training
    assert torch.equal(eval_in, eval_out)  # none in eval mode


def bf16_lora_rank(rank: int, world: int, port: int, models: dict, zero: tuple[int, int], out_dir: str):
    """The LoRA recipe's stage (LoRA on the LLM, the projector in full) under ZeRO (stage, hpZ size) in bf16, as on
    GPUs."""
    from llava_core.train.engine import BF16_ON_CPU_ENV, optimizer_step

    os.environ["LOCAL_RANK"], os.environ[BF16_ON_CPU_ENV] = str(rank), "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    stage = stage_settings(lora=LoraSettings(r=4, alpha=8, dropout=0.0), zero_stage=zero[0], micro_batch_size=1,
                           zero_hpz_partition_size=zero[1], global_batch_size=4,
                           lr=1e-2)  # 2 micro-batches a rank: gradients accumulate
    engine, _ = build(models, stage, world)
    # under hpZ every partitioned parameter, the tower's and the LLM's loaded in their own zero.Init, has the group
    hpz_groups = {id(getattr(p, "ds_zero_param_process_group", None)) for p in engine.module.parameters()
                  if hasattr(p, "ds_id")}
    dtypes = sorted({str(p.dtype) for p in engine.module.parameters() if p.requires_grad})
    rows = samples(engine, 2, seed=rank)
    numerator, denominator = optimizer_step(engine, [batch_of(rows[:1]), batch_of(rows[1:])], "token",
                                            torch.device("cpu"))
    lora_b = [p for n, p in engine.module.named_parameters() if "lora_B" in n]
    import deepspeed

    with deepspeed.zero.GatheredParameters(lora_b):  # LoRA's B starts at zero: the step moved it
        moved = sum(float(p.float().abs().sum()) for p in lora_b)
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"dtypes": dtypes, "loss": float(numerator / denominator), "moved": moved,
                       "hpz_groups": len(hpz_groups), "no_hpz": id(None) in hpz_groups,
                       "accumulate_and_reduce": [str(engine.get_data_types()[1]), str(engine.communication_data_type)]},
                      f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("zero", [(2, 1), (3, 1), (3, 2)], ids=["zero2", "zero3", "zero3-hpz"])
def test_the_lora_recipe_trains_in_bf16_and_accumulates_gradients_in_fp32(tiny_dataset, tmp_path, zero):
    """peft upcasts new adapters to fp32 by default; DeepSpeed's ZeRO-3 then refuses a parameter group of mixed
    dtypes (fp32 LoRA, bf16 projector copy). Only bf16 shows it: this runs the CPU test mode. With ZeRO++'s hpZ,
    DeepSpeed refused the second zero.Init (the LLM's, after the tower's) unless its group is reused."""
    mp.start_processes(bf16_lora_rank, args=(2, free_port(), tiny_dataset, zero, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    result = json.load(open(tmp_path / "result.json"))
    if zero[0] == 3:  # one group for every partitioned parameter: hpZ's when asked for, none otherwise
        assert (result["hpz_groups"], result["no_hpz"]) == (1, zero[1] == 1)
    assert result["dtypes"] == ["torch.bfloat16"]
    assert result["accumulate_and_reduce"] == ["torch.float32", "torch.float32"]
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert result["moved"] > 0


def mixed_modality_rank(rank: int, world: int, port: int, models: dict, out_dir: str):
    """ZeRO-3 with the whole model trained and partitioned (tower included): rank 0's micro-batch is text-only, rank
    1's has images, as modality-grouped batching deals them. The tower's parameters are gathered by whichever ranks
    run it; a rank that skipped it would leave the others waiting in its all-gathers for ever."""
    from llava_core.data.image_layouts import CropPixels
    from llava_core.model.lora import llava_of
    from llava_core.train.engine import model_inputs, optimizer_step

    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    stage = stage_settings(trainable=["vision", "projector", "llm"], zero_stage=3, micro_batch_size=2,
                           global_batch_size=4)
    engine, processor = build(models, stage, world)
    config = llava_of(engine.module).config
    size = config.vision_config.image_size
    batch = batch_of(samples(engine, 2, seed=rank))
    if rank == 0:  # the same rows without their images: text only
        keep = batch["input_ids"] != config.image_token_index
        width = int(keep.sum(1).max())
        batch = {k: torch.stack([row[m][:width] for row, m in zip(batch[k], keep)]) for k in
                 ("input_ids", "labels", "attention_mask")} | {"pixel_values": None}
    pixels = CropPixels((3, size, size), config.image_seq_length)
    inputs = model_inputs(batch, config.image_token_index, pixels, processor.tokenizer.pad_token_id, flatten=False)
    numerator, denominator = optimizer_step(engine, [inputs], "token", torch.device("cpu"))
    dist.all_reduce(numerator)  # the step's loss over both ranks, as the loop reports it
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"loss": float(numerator / denominator), "rows": int(inputs["input_ids"].shape[0])}, f)
    dist.barrier()
    dist.destroy_process_group()


def test_a_text_only_micro_batch_beside_image_ones_does_not_hang_zero3(tiny_dataset, tmp_path):
    """The blank image row (`with_blank_image_row`) keeps every rank in the tower's ZeRO-3 gathers. Without it (checked
    by hand) gloo aborts rank 1 on the mismatched collectives ("Received data size doesn't match expected size. Is
    there a distributed collective mismatch"); NCCL would wait for ever instead, which the deadline turns into a
    failure."""
    context = mp.start_processes(mixed_modality_rank, args=(2, free_port(), tiny_dataset, str(tmp_path)), nprocs=2,
                                 start_method="spawn", join=False)
    deadline, started = 240, time.monotonic()
    while not context.join(timeout=5):
        if time.monotonic() - started > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ZeRO-3 step with a text-only rank did not finish in {deadline} s (a hang)")
    results = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in (0, 1)]
    assert results[0]["rows"] == 3 and results[1]["rows"] == 2  # rank 0 got its blank image row
    assert results[0]["loss"] == results[1]["loss"] and math.isfinite(results[0]["loss"])
