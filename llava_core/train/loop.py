"""The per-worker training loop of the align and instruct stages (runs inside Ray Train workers).

Build the stage's model (partitioned as it loads under ZeRO-3), hand it to DeepSpeed (`train/engine.py`), then step
through the batch plan, each rank streaming its own rows (`train/streaming.py`), reporting checkpoints to Ray Train
(`train/checkpoints.py`). Resuming restores the DeepSpeed state and the step counter from the last checkpoint Ray
Train hands back; the final checkpoint holds only the step counter and history (the stage output holds the weights),
so no optimizer state is kept once a stage is done. Everything the loop reads is one `LoopConfig`, built by the
driver (`train/trainer.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np
import ray.train
import torch

from llava_core import storage
from llava_core.data.image_layouts import pixel_inputs
from llava_core.model.build import official_projector_bytes
from llava_core.model.lora import llava_of, trained_module
from llava_core.model.zero3 import gathered
from llava_core.progress import RateWindow, progress_text
from llava_core.schema import PreferenceSettings, ScalingSettings, TrainStageSettings
from llava_core.train import checkpoints, preference_passes
from llava_core.train.batching import BatchPlan, capped_steps
from llava_core.train.engine import (
    build_engine,
    deepspeed_config,
    grad_accum_steps,
    model_inputs,
    optimizer_step,
    supervised_tokens,
    training_dtype,
    zero3_loading,
)
from llava_core.train.freeze import describe_training
from llava_core.train.metrics import (
    MetricsWriter,
    flops_counter,
    micro_batch_flops,
    peak_device_gib,
    peak_flops,
    peak_rss_gib,
)
from llava_core.train.save import save_hf_model
from llava_core.train.streaming import BatchPrefetcher, TrainingRows

# The ETA's rate is the mean of the last STEP_WINDOW steps: enough to smooth one slow step (a data stall, a
# checkpoint save) to a few percent of the ETA, few enough that a change of rate shows within ~50 steps (minutes).
STEP_WINDOW = 50


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What every rank's loop reads, built once on the driver: the workflow's stage and scaling sections as they are,
    plus what the stage runner resolved (the shards, the base models' storage URIs, the stage directory). Ray Train
    pickles it to each worker inside `train_loop_config` (`{"config": LoopConfig(...)}`)."""
    stage_name: str  # align, knowledge or instruct: names the log lines, metrics and trackers' runs
    stage: TrainStageSettings
    scaling: ScalingSettings
    shards: tuple[str, ...]  # prepare's parquet shards of the stage's dataset
    output_dir: str  # the stage directory: the hand-off, metrics.jsonl, trainable.json
    vision_path: str  # the base models' storage URIs or hub ids, which a fresh model is assembled from
    llm_path: str
    init_from: str | None = None  # the previous stage's full HF model; None: assemble a fresh one from the above
    plan_index: str | None = None  # prepare's index of the shards' rows; None: each rank scans the shards' footers
    family: str = "llava"  # `model.family`
    image_layout: str = ""  # `prepare.image_aspect_ratio` ("": the family's own)
    template: str = "vicuna_v1"  # the dataset's; the processor's chat template follows it
    save_model: bool = True  # False: hand off the projector alone (`mm_projector.bin`)
    eval_shards: tuple[str, ...] = ()  # the preference stage's held-out pairs (`eval_dataset`), prepared
    eval_plan_index: str | None = None
    start_time: float = 0.0  # when the driver started the stage (set as it starts): the progress lines' elapsed


def build_model(config: LoopConfig, device: torch.device):
    """The stage's starting model in the training dtype with the chosen attention, and its processor."""
    from llava_core.model.build import assemble, load_llava, load_official_projector

    stage, use_gpu = config.stage, config.scaling.use_gpu
    dtype = training_dtype(stage, use_gpu)
    # ZeRO 0-2 keep whole weights on every GPU: load them straight there, not first into host memory per rank.
    on = device if use_gpu and stage.zero_stage != 3 else None
    torch.manual_seed(stage.seed)  # every rank must start from the same fresh projector (and LoRA)
    if config.init_from:
        model, processor = load_llava(config.init_from, dtype, stage.attn_implementation, on)
    else:
        model, processor = assemble(config.family, config.vision_path, config.llm_path, dtype, config.template,
                                    stage.attn_implementation, on, config.image_layout)
    if stage.init_projector:
        load_official_projector(model, stage.init_projector)
    return model, processor


def train_loop_per_worker(train_loop_config: dict) -> None:
    config: LoopConfig = train_loop_config["config"]  # Ray Train hands the loop a dict
    stage, use_gpu = config.stage, config.scaling.use_gpu
    pairs = isinstance(stage, PreferenceSettings)  # the preference stage: pairs, the reference, its loss
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    examples = TrainingRows.open(list(config.shards), config.plan_index)  # plan columns + row locations only
    lengths, num_images = examples.lengths, examples.num_images
    grad_accum = grad_accum_steps(stage, world)
    plan = BatchPlan(world, stage.micro_batch_size, grad_accum, stage.seed, stage.sampling, stage.packing,
                     stage.pack_length)
    epoch_steps = [plan.steps_in_epoch(lengths, num_images, e) for e in range(stage.epochs)]
    if stage.max_steps:
        epoch_steps = capped_steps(epoch_steps, stage.max_steps)
    total_steps = sum(epoch_steps)
    if total_steps == 0:
        raise ValueError(f"{examples.num_rows} rows are fewer than one global batch of {plan.global_batch_size}")

    with zero3_loading(deepspeed_config(stage, world, use_gpu)):
        model, processor = build_model(config, device)
    engine, scheduler, groups = build_engine(model, stage, world, total_steps, use_gpu, device)
    model = engine.module
    parts = describe_training(model, groups)
    flops = flops_counter(model, stage.trainable, stage.lora is not None)
    peak = peak_flops(config.scaling.peak_tflops_per_worker, use_gpu)

    start_step, history = checkpoints.restore(engine, total_steps, checkpoints.scratch_dir(config.scaling.local_dir))
    writer = (MetricsWriter(config.stage_name, stage, tensorboard_dir(config), config.output_dir, history)
              if rank == 0 else None)
    if rank == 0:
        log_start(config.stage_name, parts, total_steps, start_step, plan, "pairs" if pairs else "samples")
    pixels = pixel_inputs(processor, llava_of(model).config.model_type, llava_of(model).config)
    pad_id, image_token_id = processor.tokenizer.pad_token_id, llava_of(model).config.image_token_id
    collation = preference_passes.Collation(image_token_id, pixels, pad_id)
    reference = (preference_reference(engine, config, examples, plan, epoch_steps, start_step, collation, device)
                 if pairs and start_step < total_steps else None)
    batches = BatchPrefetcher(examples, plan.rank_micro_batches(lengths, num_images, epoch_steps, start_step, rank),
                              stage.packing, pad_id, pixels, pairs=pairs)
    flatten = stage.packing and stage.attn_implementation == "flash_attention_2"

    window = {"t": time.time(), "tokens": 0, "samples": 0, "flops": 0.0, "data_wait_s": 0.0}
    # Timed from here: start-up, model loading and the steps a resume skipped are never in the rate.
    step_times = RateWindow(STEP_WINDOW, window["t"], start_step)
    for step in range(start_step, total_steps):
        step_batches = []
        for _ in range(grad_accum):  # this rank's micro-batches of the step, read ahead in plan order
            micro, batch, waited = batches.get()
            window["data_wait_s"] += waited
            rows = np.concatenate(micro)  # counted from the collated batch, before any blank image row
            inputs = model_inputs(batch, image_token_id, pixels, pad_id, flatten)
            step_batches.append(preference_passes.PairBatch(inputs, len(rows)) if pairs else inputs)
            tokens = int(lengths[rows].sum())
            window["tokens"] += tokens
            window["samples"] += len(rows)
            # a pair's two sequences each attend over their own length (the index holds only their sum)
            sequences = batch["attention_mask"].sum(dim=1).numpy() if pairs else lengths[rows]
            window["flops"] += micro_batch_flops(flops, sequences, pixels.views(batch), supervised_tokens(batch))
        if pairs:
            mine = reference.train[rank, step * grad_accum:(step + 1) * grad_accum]
            loss, means = preference_passes.preference_step(engine, step_batches, mine, stage, device)
        else:
            loss, means = optimizer_step(engine, step_batches, stage.loss_normalization, device), {}
        record = step_metrics(engine, scheduler, loss, window, step, world, peak, device, means)
        history.append(record)
        is_last = step + 1 == total_steps
        if rank == 0:
            writer.write(record)
            step_times.add(record["time"], step + 1)
            if (step + 1) % stage.log_every == 0 or is_last or step == start_step:
                say(progress_line(config.stage_name, record, total_steps, config.start_time, step_times))
        if is_last and reference is not None and reference.heldout is not None:
            report_heldout(engine, config, reference.heldout, collation, device, rank)
        if is_last or (stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0):
            side_files = {preference_passes.REFERENCE_FILE: reference.saved} if reference is not None else {}
            save_and_report(engine, processor, step + 1, total_steps, history, parts, rank, config, is_last,
                            side_files)
    batches.close()
    if writer:
        writer.close()


class Reference(NamedTuple):
    """The preference stage's reference sums: every rank's training micro-batches', the held-out pairs' (None
    without `eval_dataset`), and both as the checkpoint keeps them."""
    train: torch.Tensor  # (world, micro-batches, pairs, 2)
    heldout: torch.Tensor | None  # (views, pairs, 2)
    saved: bytes


def preference_reference(engine, config: LoopConfig, examples, plan, epoch_steps, start_step, collation,
                         device) -> Reference:
    """The reference sums: read back from the checkpoint a resumed stage starts from (its weights are no longer the
    reference), else computed now, before the first step, with the starting weights."""
    saved = checkpoints.read_latest(preference_passes.REFERENCE_FILE) if start_step else None
    if start_step and saved is None:
        raise RuntimeError(f"resuming the preference stage at step {start_step}: its checkpoint has no "
                           f"{preference_passes.REFERENCE_FILE}, and the reference cannot be recomputed from weights "
                           f"that have trained; rerun the stage from its start")
    if saved is not None:
        return Reference(*preference_passes.read_reference(saved, device), saved)
    rank = torch.distributed.get_rank()
    started = time.time()
    micro_batches = plan.rank_micro_batches(examples.lengths, examples.num_images, epoch_steps, 0, rank)
    train = preference_passes.training_reference(engine, examples, micro_batches, collation, device)
    heldout = (preference_passes.heldout_logps(engine, heldout_rows(config), config.stage.micro_batch_size,
                                               collation, device) if config.eval_shards else None)
    if rank == 0:
        say(f"[{config.stage_name}] reference log-probs of {train.shape[0] * train.shape[1] * train.shape[2]:,} "
            f"training pairs" + (f" and {heldout.shape[1]:,} held-out pairs" if heldout is not None else "")
            + f" in {time.time() - started:.1f}s")
    return Reference(train, heldout, preference_passes.reference_bytes(train, heldout))


def heldout_rows(config: LoopConfig) -> TrainingRows:
    return TrainingRows.open(list(config.eval_shards), config.eval_plan_index)


def report_heldout(engine, config: LoopConfig, reference: torch.Tensor, collation, device, rank) -> None:
    """The implicit reward on the held-out pairs after the last step (every rank computes its share), written by
    rank 0 to `preference_eval.json` in the stage directory."""
    policy = preference_passes.heldout_logps(engine, heldout_rows(config), config.stage.micro_batch_size, collation,
                                             device)
    if rank == 0:
        report = preference_passes.heldout_rewards(policy, reference, config.stage.beta)
        storage.write_json(storage.join(config.output_dir, "preference_eval.json"), report)
        say(f"[{config.stage_name}] held-out pairs: {json.dumps(report)}")


def tensorboard_dir(config: LoopConfig) -> str:
    """TensorBoard events go straight into the stage directory when it is local; into a temp dir (copied there by
    the MetricsWriter) when it is remote."""
    if storage.is_remote(config.output_dir):
        return os.path.join(tempfile.gettempdir(), "llava-ray-tensorboard", config.stage_name)
    return os.path.join(config.output_dir, "tensorboard")


def step_metrics(engine, scheduler, loss: tuple, window: dict, step: int, world: int, peak, device,
                 means: dict | None = None) -> dict:
    """The step's loss over every rank (as normalised: per token or per micro-batch), throughput summed over ranks
    since the last step, data wait and peak memory as the worst rank's. `means`: per-micro-batch values summed over
    this rank's micro-batches, reported as their mean over the step's micro-batches of all ranks (the preference
    stage's rewards). Reduced on the training device (NCCL reduces nothing on the host)."""
    numerator, denominator = loss
    means = means or {}
    counts = torch.tensor([window["tokens"], window["samples"], window["flops"]], dtype=torch.float64, device=device)
    sums = torch.cat([numerator.to(torch.float64).reshape(1), counts,
                      *[torch.as_tensor(v, dtype=torch.float64, device=device).reshape(1) for v in means.values()]])
    torch.distributed.all_reduce(sums)
    # The slowest rank's data wait gates the step; the largest rank's peak memory is what a node must hold.
    worst = torch.tensor([window["data_wait_s"], peak_rss_gib(), peak_device_gib(device)], dtype=torch.float64,
                         device=device)
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    sums, worst = sums.tolist(), worst.tolist()
    now = time.time()
    elapsed = max(now - window["t"], 1e-9)
    window.update(t=now, tokens=0, samples=0, flops=0.0, data_wait_s=0.0)
    grad_norm = engine.get_global_grad_norm()
    return {
        "step": step + 1,
        "loss": round(sums[0] / float(denominator), 6),
        "lr": float(scheduler.get_last_lr()[0]),
        "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
        "tokens_per_s": round(sums[1] / elapsed, 2),
        "samples_per_s": round(sums[2] / elapsed, 2),
        "tflops_per_s": round(sums[3] / elapsed / 1e12, 4),
        "mfu": None if peak is None else round(sums[3] / elapsed / (world * peak), 4),
        "data_wait_s": round(worst[0], 4),  # time blocked waiting for prefetched batches, max over ranks
        "rss_gib": round(worst[1], 3),  # peak resident memory of the largest rank so far
        "gpu_peak_gib": round(worst[2], 3),  # peak GPU memory allocated by the largest rank so far (0 on CPU)
        "time": round(now, 3),
        **{key: round(value / float(denominator), 6) for key, value in zip(means, sums[4:])},
    }


def say(line: str) -> None:
    # Ray Train patches print() to also log each line, which shows every line twice on the driver.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def progress_line(stage_name: str, record: dict, total_steps: int, start_time: float, step_times: RateWindow) -> str:
    """The stage's progress (`progress.progress_text`: steps, %, s/step, elapsed since the driver started the stage,
    the ETA from the recent steps' rate), then the step's numbers."""
    head = progress_text(stage_name, "step", record["step"], total_steps, step_times, record["time"] - start_time)
    mfu = "" if record.get("mfu") is None else f" MFU {record['mfu']:.1%}"
    rewards = ("" if "rewards/accuracies" not in record else
               f" reward acc {record['rewards/accuracies']:.2f} margin {record['rewards/margins']:.3f} "
               f"KL {record['kl']:.4f}")
    return (f"{head} | loss {record['loss']:.4f}{rewards} lr {record['lr']:.2e} samples/s "
            f"{record['samples_per_s']:.1f} tokens/s {record['tokens_per_s']:.0f}{mfu}")


def log_start(stage_name: str, parts, total_steps, start_step, plan, rows: str = "samples") -> None:
    trained = {k: f"{v['parameters']:,} @ lr {v['lr']:g}" for k, v in parts["trained"].items()}
    frozen = {k: f"{v:,}" for k, v in parts["frozen"].items()}
    say(f"[{stage_name}] training {trained} | frozen {frozen} | {total_steps} steps of "
        f"{plan.global_batch_size} {'packed rows' if plan.packing else rows} "
        f"({plan.world_size} workers x {plan.micro_batch_size} x "
        f"{plan.grad_accum} accumulation)" + (f" | resuming at step {start_step}" if start_step else ""))


def save_and_report(engine, processor, step, total_steps, history, parts, rank, config: LoopConfig,
                    is_last, side_files: dict[str, bytes]) -> None:
    """Every rank writes its DeepSpeed shard into the step's checkpoint (`train/checkpoints.py`: node-local, uploaded
    in the background); side files (the step counter and history, and `side_files`) come from rank 0 only. The last
    checkpoint skips the DeepSpeed state (optimizer included: 12 bytes per trained parameter, 84 GB for 7B): the stage
    output written beside it holds the weights, and a resumed finished stage has nothing to train."""
    directory = checkpoints.new_directory(checkpoints.scratch_dir(config.scaling.local_dir), step)
    if not is_last:
        engine.save_checkpoint(directory, tag=checkpoints.DS_TAG, exclude_frozen_parameters=True)
    if rank == 0:
        with open(os.path.join(directory, checkpoints.STATE_FILE), "w") as f:
            json.dump({"step": step, "total_steps": total_steps, "history": history}, f)
        for name, data in side_files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
    if is_last:  # every rank: under ZeRO-3 all of them take part in gathering the full weights
        write_stage_output(engine.module, processor, parts, config, rank)
    checkpoints.report({"step": step, "loss": history[-1]["loss"]}, directory, final=is_last)


def write_stage_output(model, processor, parts, config: LoopConfig, rank) -> None:
    """The stage's hand-off: `mm_projector.bin` (the official stage-1 file), and when the next stage needs more than
    the projector (`save_model`) a complete HF LLaVA directory (LoRA merged in) in the training dtype, with greedy
    generation defaults: the export is this directory as it is. Also the adapter alone when LoRA trained and
    `trainable.json`; the metrics are rank 0's MetricsWriter's. Every rank takes part in the gathers; global rank 0
    writes."""
    projector = trained_module(llava_of(model).model.multi_modal_projector)  # under LoRA, peft's trained copy
    with tempfile.TemporaryDirectory(dir=checkpoints.scratch_dir(config.scaling.local_dir)) as local:
        with gathered(list(projector.parameters())):  # 21M parameters for 7B: gathered alone
            if rank == 0:
                with open(os.path.join(local, "mm_projector.bin"), "wb") as f:
                    f.write(official_projector_bytes(projector))
        if config.save_model:
            save_hf_model(model, processor, os.path.join(local, "model"),
                          training_dtype(config.stage, config.scaling.use_gpu), writer=rank == 0)
        if rank != 0:
            return
        with open(os.path.join(local, "trainable.json"), "w") as f:
            json.dump(parts, f, indent=1)
        storage.copy_dir(local, config.output_dir)
