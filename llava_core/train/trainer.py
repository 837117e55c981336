"""Driver side of a training stage: one Ray Train `TorchTrainer` running `train_loop_per_worker`.

Ray Train owns the worker group, restarts it from the latest checkpoint on failure (`max_failures`), and keeps
checkpoints in `<stage dir>/ray/<stage>`; running the same stage again resumes from there.
"""
from __future__ import annotations

import dataclasses
import time

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from llava_core import storage
from llava_core.config import ScalingSettings
from llava_core.train.loop import LoopConfig, train_loop_per_worker


def scaling_config(scaling: ScalingSettings) -> ScalingConfig:
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources)


def run_training_stage(config: LoopConfig, run_name: str) -> dict:
    """Train one stage; its hand-off lands in `config.output_dir` (the HF model under `model/`, or the projector
    alone) and its metrics in `metrics.jsonl` there.

    `run_name` names the Ray Train run under `<output_dir>/ray`: a run with the same name resumes from its latest
    checkpoint, so the workflow puts the stage's settings hash in it (changed settings start fresh; a rerun after a
    crash resumes). Every path in `config` is a storage URI or a hub id, never a file on this machine: workers may
    run on other nodes."""
    return fit(stage_trainer(config, stage_run_config(config, run_name)))


def stage_run_config(config: LoopConfig, run_name: str) -> RunConfig:
    """Where the run keeps its checkpoints and how it survives failures. Ray Train's own `callbacks` (run in its
    controller: every checkpoint report and worker failure) can be added with `dataclasses.replace`."""
    return RunConfig(
        name=run_name,
        storage_path=storage.join(config.output_dir, "ray"),
        failure_config=FailureConfig(max_failures=config.stage.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.stage.keep_checkpoints),
    )


def stage_trainer(config: LoopConfig, run_config: RunConfig) -> TorchTrainer:
    config = dataclasses.replace(config, start_time=time.time())  # the progress lines' elapsed time starts here
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config},  # Ray Train passes the loop a dict
        scaling_config=scaling_config(config.scaling),
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),
        run_config=run_config,
    )


def fit(trainer: TorchTrainer) -> dict:
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.metrics or {}
