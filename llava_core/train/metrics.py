"""Per-step training metrics from rank 0: metrics.jsonl and TensorBoard in the stage directory, kept current while
the stage runs (also in S3), and MLflow or W&B when configured.

MFU divides the model FLOPs of `llava_core.flops` (the same model the plan uses) by the device's peak; here the
part sizes come from the model's own parameters, so the count is exact for whatever model trains.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import threading

from llava_core import flops as flop_model, storage
from llava_core.schema import TrainStageSettings

log = logging.getLogger(__name__)


def peak_flops(configured_tflops: float | None, use_gpu: bool) -> float | None:
    """Peak FLOP/s of one worker: `scaling.peak_tflops_per_worker` when set, else this CUDA device's entry in
    `llava_core.flops.GPUS`; None (no MFU) on CPU or an unlisted device."""
    if configured_tflops:
        return configured_tflops * 1e12
    if use_gpu:
        import torch

        key = flop_model.gpu_for_device(torch.cuda.get_device_name())
        if key:
            return flop_model.GPUS[key].tflops * 1e12
    return None


def model_part_sizes(model) -> flop_model.PartSizes:
    """Part sizes counted from the parameters (ZeRO-3 shards counted whole). The input embedding table is a lookup,
    not a matmul; the lm_head is a part of its own (counted even when tied to that table)."""
    from llava_core.model.lora import is_kept_original, llava_of
    from llava_core.train.freeze import numel, part_of

    llava = llava_of(model)
    embed, head = llava.get_input_embeddings().weight, llava.get_output_embeddings().weight
    counts = {"vision": 0, "projector": 0, "llm": 0, "lora": 0}
    for name, param in model.named_parameters():
        # the lm_head is its own part; peft's frozen original beside a trained copy runs no matmul
        if param is not embed and param is not head and not is_kept_original(name):
            counts[part_of(name)] += numel(param)
    from llava_core.model.families import features_per_view, tower_has_cls

    vision, text = llava.config.vision_config, llava.config.text_config
    patches = features_per_view(vision)
    head_size = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    # Per tower pass (a view: the one crop of LLaVA-1.5, a tile or base view of AnyRes): the projector maps every
    # patch feature; row newlines are a copy, not a matmul. The tower runs the layers it holds.
    return flop_model.PartSizes(**counts, lm_head=numel(head), vision_positions=patches + int(tower_has_cls(vision)),
                                image_tokens=patches,
                                llm_layers=text.num_hidden_layers,
                                llm_attention_width=text.num_attention_heads * head_size,
                                vision_layers=len(tower_layers(llava)), vision_width=vision.hidden_size)


def tower_layers(llava):
    """The vision tower's encoder layers (CLIP and SigLIP alike keep them at `vision_model.encoder.layers`)."""
    from llava_core.model.lora import trained_module

    tower = trained_module(llava.model.vision_tower)
    return getattr(tower, "vision_model", tower).encoder.layers


def micro_batch_flops(flops, lengths, views: int, supervised: int) -> float:
    """Model FLOPs of a micro-batch of samples of these token `lengths` (a numpy array), `views` tower passes and
    `supervised` labelled tokens."""
    return flops(int(lengths.sum()), views, float((lengths.astype("float64") ** 2).sum()), supervised)


def flops_counter(model, trainable: list[str], lora: bool):
    """A function (tokens, views, squared_lengths, supervised) -> model FLOPs of one micro-batch, for this model and
    stage (`views`: tower passes, one per LLaVA-1.5 image; `squared_lengths`: the sum of its samples' lengths
    squared; `supervised`: its labelled tokens)."""
    return flop_model.training_flops(model_part_sizes(model), trainable, lora)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_device_gib(device) -> float:
    """The training device's peak allocated memory so far (what the caching allocator handed out; `nvidia-smi` shows
    more: its reserved pool and the CUDA context); 0 on CPU, where `peak_rss_gib` is the figure."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


class MetricsWriter:
    """Rank 0's metrics: `metrics.jsonl` and TensorBoard events in the stage directory, kept current while the stage
    runs (copied every `metrics_sync_every` optimizer steps by a MetricsSync, and at close), plus MLflow or W&B when
    configured. `history` (restored from the checkpoint when resuming) comes first in metrics.jsonl, and TensorBoard
    drops the events a failed attempt wrote after that checkpoint."""

    def __init__(self, stage_name: str, stage: TrainStageSettings, tensorboard_dir: str, output_dir: str,
                 history: list[dict]):
        from tensorboardX import SummaryWriter

        self.records = list(history)
        self.tensorboard = SummaryWriter(tensorboard_dir, purge_step=history[-1]["step"] + 1 if history else None)
        self.sync_every = stage.metrics_sync_every
        self.sync = MetricsSync(output_dir, tensorboard_dir, self.tensorboard.flush)
        self.tracker = stage.tracking
        if self.tracker == "mlflow":
            import mlflow  # only imported when configured; MLFLOW_TRACKING_URI says where

            mlflow.start_run(run_name=stage_name)
            mlflow.log_params({k: v for k, v in dataclasses.asdict(stage).items()
                               if isinstance(v, (int, float, str, bool))})
        elif self.tracker == "wandb":
            import wandb  # only imported when configured; WANDB_PROJECT / WANDB_API_KEY from the environment

            wandb.init(project=os.environ.get("WANDB_PROJECT", "llava-ray"), name=stage_name,
                       config=dataclasses.asdict(stage))

    def write(self, record: dict) -> None:
        self.records.append(record)
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        for key, value in values.items():
            self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
        if self.tracker == "mlflow":
            import mlflow

            mlflow.log_metrics(values, step=record["step"])
        elif self.tracker == "wandb":
            import wandb

            wandb.log(values, step=record["step"])
        if self.sync_every and record["step"] % self.sync_every == 0:
            self.sync.request(list(self.records))

    def close(self) -> None:
        """The final copy runs here, not in the background: a stage whose metrics did not land has failed."""
        self.sync.stop()
        self.tensorboard.close()
        self.sync.copy(self.records)
        if self.tracker == "mlflow":
            import mlflow

            mlflow.end_run()
        elif self.tracker == "wandb":
            import wandb

            wandb.finish()


class MetricsSync:
    """Copies metrics to the stage directory in a background thread: the whole `metrics.jsonl`, and the TensorBoard
    events when the stage directory is remote (they are written to a local directory first; a local stage
    directory holds them already). One copy runs at a time and a request made meanwhile replaces any waiting one, so
    a slow bucket costs freshness, never training time; a failed copy is logged and the next one copies everything
    again."""

    def __init__(self, output_dir: str, tensorboard_dir: str, flush_events):
        self.output_dir, self.tensorboard_dir, self.flush_events = output_dir, tensorboard_dir, flush_events
        self.pending: list[dict] | None = None
        self.stopped = False
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self.run, name="metrics-sync", daemon=True)
        self.thread.start()

    def request(self, records: list[dict]) -> None:
        with self.wake:
            self.pending = records
            self.wake.notify()

    def run(self) -> None:
        while True:
            with self.wake:
                while self.pending is None and not self.stopped:
                    self.wake.wait()
                if self.stopped:
                    return
                records, self.pending = self.pending, None
            try:
                self.copy(records)
            except Exception as error:  # OSError, pyarrow's and the S3 SDK's own: none may stop training
                log.warning("copying metrics to %s failed, retrying at the next sync: %s", self.output_dir, error)

    def copy(self, records: list[dict]) -> None:
        self.flush_events()
        storage.write_text(storage.join(self.output_dir, "metrics.jsonl"),
                           "".join(json.dumps(r) + "\n" for r in records))
        if storage.is_remote(self.output_dir) and os.path.isdir(self.tensorboard_dir):
            storage.copy_dir(self.tensorboard_dir, storage.join(self.output_dir, "tensorboard"))

    def stop(self) -> None:
        """Let the copy in flight finish and start no other."""
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join()


def read_history(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
