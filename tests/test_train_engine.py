"""The training engine as the worker loop drives it (build_model, build_engine, optimizer_step, save_hf_model), run by
real DeepSpeed in 1 or 2 CPU processes over gloo, without Ray Train (the loop's Ray side has its own tests):

- the model trains in train mode: gradient checkpointing really recomputes, LoRA dropout is active;
- token-normalised loss: the same samples give the same gradient however they are split into micro-batches and ranks
  (and sample normalisation does not, so the check can fail);
- under ZeRO-3 no rank holds the whole model, at load, in a step or while the weights are saved, and the saved
  checkpoint loads back exactly.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llava_core.config import LoraSettings, ScalingSettings, TrainStageSettings
from tests.ports import free_port

pytestmark = pytest.mark.integration


def stage_settings(**overrides) -> TrainStageSettings:
    settings = dict(trainable=["projector", "llm"], global_batch_size=4, micro_batch_size=4, lr=1e-3, zero_stage=0,
                    warmup_ratio=0.0, max_grad_norm=1e9)  # no clipping: gradients are compared as computed
    settings.update(overrides)
    return TrainStageSettings(**settings)


def loop_config(models: dict, stage: TrainStageSettings, world: int = 1):
    from llava_core.train.loop import LoopConfig

    return LoopConfig(stage_name="instruct", stage=stage, scaling=ScalingSettings(num_workers=world), shards=(),
                      plan_index=None, output_dir="", init_from=None, vision_path=models["vision"],
                      llm_path=models["llm"], family="llava", image_layout="pad", template="vicuna_v1",
                      save_model=True, start_time=0.0)


def build(models: dict, stage: TrainStageSettings, world: int = 1, total_steps: int = 10):
    """What train_loop_per_worker does before its first step."""
    from llava_core.train.engine import build_engine, deepspeed_config, zero3_loading
    from llava_core.train.loop import build_model

    with zero3_loading(deepspeed_config(stage, world, False)):
        model, processor = build_model(loop_config(models, stage, world), torch.device("cpu"))
    engine, _, _ = build_engine(model, stage, world, total_steps, False, torch.device("cpu"))
    return engine, processor


def samples(engine, count: int = 8, seed: int = 0) -> list[dict]:
    """Single samples with an image and very different numbers of supervised tokens (30, then 2)."""
    from llava_core.model.lora import llava_of

    config = llava_of(engine.module).config
    g = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    rows = []
    for i in range(count):
        answer = 30 if i < count // 2 else 2  # long answers first: micro-batches differ in composition
        text = torch.randint(5, 100, (1, 6 + answer), generator=g)
        ids = torch.cat([text[:, :3], torch.full((1, config.image_seq_length), config.image_token_index),
                         text[:, 3:]], dim=1)
        labels = torch.full_like(ids, -100)
        labels[:, -answer:] = ids[:, -answer:]
        rows.append({"input_ids": ids, "labels": labels, "pixel_values": torch.randn(1, 3, size, size, generator=g)})
    return rows


def batch_of(rows: list[dict]) -> dict:
    """Right-padded, as collate pads."""
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
           "labels": torch.full((len(rows), width), -100, dtype=torch.long),
           "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
           "pixel_values": torch.cat([r["pixel_values"] for r in rows])}
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        out["input_ids"][i, :n], out["labels"][i, :n], out["attention_mask"][i, :n] = r["input_ids"], r["labels"], 1
    return out


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group for DeepSpeed in this process (kept: DeepSpeed engines hold on to it)."""
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed wants it, as torchrun and Ray Train set it
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield


def test_gradient_checkpointing_recomputes_every_decoder_layer(tiny_dataset, one_rank):
    from llava_core.model.lora import llava_of
    from llava_core.train.engine import optimizer_step

    calls = {}
    for checkpointing in (False, True):
        engine, _ = build(tiny_dataset, stage_settings(gradient_checkpointing=checkpointing, micro_batch_size=2,
                                                   global_batch_size=2))
        assert engine.module.training
        # transformers checkpoints a decoder layer's `forward` (its own hooks stay outside): count calls of a module
        # inside it, as they start (torch stops a recomputation once it has every saved tensor back).
        inside = llava_of(engine.module).model.language_model.layers[0].mlp
        count = []
        handle = inside.register_forward_pre_hook(lambda *_: count.append(1))  # noqa: B023 - removed below
        optimizer_step(engine, [batch_of(samples(engine, 2))], "token", torch.device("cpu"))
        handle.remove()
        calls[checkpointing] = len(count)
    assert calls == {False: 1, True: 2}  # once forward; checkpointed: once more in backward


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


def gradients_after_one_step(engine, micro_batches: list[dict], normalization: str) -> dict:
    """Every trained parameter's gradient as DeepSpeed hands it to the optimizer (after accumulation and the
    all-reduce over ranks), captured at the optimizer's step."""
    from llava_core.train.engine import optimizer_step

    captured = {}
    optimizer = engine.optimizer
    original = optimizer.step

    def capture(*args, **kwargs):
        for name, param in engine.module.named_parameters():
            if param.grad is not None:
                captured[name] = param.grad.detach().clone()
        return original(*args, **kwargs)

    optimizer.step = capture
    optimizer_step(engine, micro_batches, normalization, torch.device("cpu"))
    optimizer.step = original
    return captured


def split(rows: list[dict], rank: int, world: int, micro: int) -> list[dict]:
    """This rank's micro-batches of one optimizer step over `rows`, as the batch plan deals them (round robin)."""
    chunks = [rows[i:i + micro] for i in range(0, len(rows), micro)]
    return [batch_of(chunk) for chunk in chunks[rank::world]]


def rank_gradients(rank: int, world: int, port: int, models: dict, micro: int, normalization: str, out: str):
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    engine, _ = build(models, stage_settings(micro_batch_size=micro, global_batch_size=8), world)
    rows = samples(engine)
    grads = gradients_after_one_step(engine, split(rows, rank, world, micro), normalization)
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def gradients(models: dict, world: int, micro: int, normalization: str, tmp_path) -> dict:
    out = str(tmp_path / f"grads-{world}-{micro}-{normalization}.pt")
    mp.start_processes(rank_gradients, args=(world, free_port(), models, micro, normalization, out), nprocs=world,
                       start_method="spawn")
    return torch.load(out)


def assert_same(a: dict, b: dict, rtol=1e-4) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=rtol, atol=1e-7 + rtol * float(a[name].abs().max())), name


def assert_differ(a: dict, b: dict) -> None:
    assert any(not torch.allclose(a[n], b[n], rtol=1e-2, atol=1e-2 * float(a[n].abs().max())) for n in a)


@pytest.mark.slow
def test_token_normalisation_gives_one_gradient_for_any_split_into_micro_batches_and_ranks(tiny_dataset, tmp_path):
    """8 samples, half with 30 supervised tokens and half with 2, as one step of 8 = 1 rank x 8, 1 rank x 4 x 2
    accumulation steps, 2 ranks x 2 x 2."""
    token = {split_: gradients(tiny_dataset, *split_, "token", tmp_path) for split_ in ((1, 8), (1, 4), (2, 2))}
    assert_same(token[(1, 8)], token[(1, 4)])
    assert_same(token[(1, 8)], token[(2, 2)])
    # LLaVA-1.5's per-micro-batch mean weighs the short answers' tokens more once they sit in their own micro-batch.
    sample = {split_: gradients(tiny_dataset, *split_, "sample", tmp_path) for split_ in ((1, 8), (2, 2))}
    assert_differ(sample[(1, 8)], sample[(2, 2)])


def anonymous_rss() -> int:
    """This process's resident anonymous memory (what it allocated; mapped checkpoint files are the page cache's)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["RssAnon"].split()[0]) * 1024


class PeakSampler:
    """The highest anonymous RSS seen, sampled every 5 ms in a thread (the kernel tracks only the total's peak)."""

    def __init__(self):
        self.peak, self._stop = anonymous_rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, anonymous_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, anonymous_rss())


def zero3_rank(rank: int, world: int, port: int, models: dict, out_dir: str):
    """Peak anonymous memory above the process's own (imports, gloo), per phase: load, one step, save."""
    from llava_core.train.engine import optimizer_step
    from llava_core.train.save import save_hf_model

    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import deepspeed  # noqa: F401  (imported code is not the model: measured from after the imports)

    import llava_core.model.build  # noqa: F401
    import llava_core.train.loop  # noqa: F401

    stage = stage_settings(trainable=["projector"], zero_stage=3, micro_batch_size=2, global_batch_size=4)
    baseline, peaks, sampler = anonymous_rss(), {}, PeakSampler()
    engine, processor = build(models, stage, world)
    peaks["load"], sampler = sampler.stop() - baseline, PeakSampler()
    optimizer_step(engine, [batch_of(samples(engine, 2, seed=rank))], "token", torch.device("cpu"))
    peaks["step"], sampler = sampler.stop() - baseline, PeakSampler()
    save_hf_model(engine.module, processor, os.path.join(out_dir, "model"), torch.float32, writer=rank == 0)
    peaks["save"] = sampler.stop() - baseline
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(peaks, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def wide_models(tiny_dataset, tmp_path_factory):
    """The tiny tower with a 336M-parameter Vicuna stand-in (1.34 GB in fp32, the CPU training dtype): big enough
    that a whole copy stands out against a worker's own memory."""
    from llava_core.quickstart import standins

    root = tmp_path_factory.mktemp("wide")
    corpus = [f"the shape {i} is red blue green" for i in range(100)]
    standins.save_vicuna(str(root / "llm"), corpus, standins.TinyModelConfig(llm_hidden=1024, llm_layers=32,
                                                                              llm_heads=8))
    return {"vision": tiny_dataset["vision"], "llm": str(root / "llm")}


@pytest.mark.slow
def test_zero3_ranks_never_hold_the_whole_model_and_the_saved_weights_load_back(wide_models, tmp_path,
                                                                                 monkeypatch):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    # glibc raises its mmap threshold up to 32 MB after freeing a big block, then keeps freed tensors of this
    # model's size (4-8 MB) in the heap: RSS would count memory already freed. A 7B model's tensors (64-180 MB)
    # are always mmapped and returned; a fixed threshold gives the test that behaviour.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    mp.start_processes(zero3_rank, args=(2, free_port(), wide_models, str(tmp_path)), nprocs=2, start_method="spawn")
    saved = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "model"))
    full = sum(p.numel() * p.element_size() for p in saved.parameters())
    assert full > 1.3e9
    for rank in (0, 1):
        peaks = json.load(open(tmp_path / f"rank{rank}.json"))
        print(f"rank {rank}, GiB above its own baseline: " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in peaks.items())
              + f"; whole model {full / 2**30:.2f}")
        # Loading and saving: its half of every parameter, the (transformers-resized, unpartitioned) embeddings and
        # one module gathered at a time. Without ZeRO-3 loading, each rank held the whole model (1.0) at load;
        # the old save gathered and cloned all of it on rank 0 (2.0).
        assert peaks["load"] < 0.6 * full and peaks["save"] < 0.6 * full
        # A step adds what DeepSpeed keeps gathered between forward and backward (stage3_max_live_parameters, 1e9
        # as in LLaVA's zero3.json: all of this model, 15% of a 7B one) and activations.
        assert peaks["step"] < full
    # The LLM did not train: its weights come back exactly, under their plain LLaVA names.
    original = AutoModelForCausalLM.from_pretrained(wide_models["llm"], dtype=torch.float32)
    assert torch.equal(saved.model.language_model.layers[31].mlp.down_proj.weight,
                       original.model.layers[31].mlp.down_proj.weight)
    assert torch.equal(saved.lm_head.weight[:original.lm_head.weight.shape[0]], original.lm_head.weight)


def bf16_lora_rank(rank: int, world: int, port: int, models: dict, zero_stage: int, out_dir: str):
    """The LoRA recipe's stage (LoRA on the LLM, the projector in full) under ZeRO in bf16, as on GPUs."""
    from llava_core.train.engine import BF16_ON_CPU_ENV, optimizer_step

    os.environ["LOCAL_RANK"], os.environ[BF16_ON_CPU_ENV] = str(rank), "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    stage = stage_settings(lora=LoraSettings(r=4, alpha=8, dropout=0.0), zero_stage=zero_stage, micro_batch_size=1,
                           global_batch_size=4, lr=1e-2)  # 2 micro-batches a rank: gradients accumulate
    engine, _ = build(models, stage, world)
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
                       "accumulate_and_reduce": [str(engine.get_data_types()[1]), str(engine.communication_data_type)]},
                      f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_the_lora_recipe_trains_in_bf16_and_accumulates_gradients_in_fp32(tiny_dataset, tmp_path, zero_stage):
    """peft upcasts new adapters to fp32 by default; DeepSpeed's ZeRO-3 then refuses a parameter group of mixed
    dtypes (fp32 LoRA, bf16 projector copy). Only bf16 shows it: this runs the CPU test mode."""
    mp.start_processes(bf16_lora_rank, args=(2, free_port(), tiny_dataset, zero_stage, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    result = json.load(open(tmp_path / "result.json"))
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
