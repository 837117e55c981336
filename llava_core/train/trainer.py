"""Driver side of a training stage: one Ray Train `TorchTrainer` running `train_loop_per_worker`.

Ray Train owns the worker group, restarts it from the latest checkpoint on failure (`max_failures`), and keeps
checkpoints in `<stage dir>/ray/<stage>`; running the same stage again resumes from there.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from llava_core import storage
from llava_core.config import ScalingSettings, TrainStageSettings
from llava_core.train.loop import LoopConfig, train_loop_per_worker


def scaling_config(scaling: ScalingSettings) -> ScalingConfig:
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources)


def run_training_stage(stage_name: str, stage: TrainStageSettings, scaling: ScalingSettings, shards: list[str],
                       stage_dir: str, vision_path: str, llm_path: str, init_from: str | None, *,
                       run_name: str | None = None, template: str = "vicuna_v1", save_model: bool = True,
                       plan_index: str | None = None, family: str = "llava", image_layout: str = "pad",
                       callbacks: Sequence[UserCallback] = ()) -> dict:
    """Train one stage; its HF model lands in `<stage_dir>/model` and its metrics in `<stage_dir>/metrics.jsonl`.

    `run_name` (default: the stage name) names the Ray Train run under `<stage_dir>/ray`: a run with the same name
    resumes from its latest checkpoint, so the workflow puts the stage's settings hash in it (changed settings
    start fresh; a rerun after a crash resumes). Every path is a storage URI or a hub id, never a file on this
    machine: workers may run on other nodes. `template` is the dataset's (the processor's chat template follows it);
    `save_model: False` hands off the projector alone (`mm_projector.bin`). `plan_index` is prepare's index of the
    shards' rows (None: each rank scans the shards' footers instead). `family` and `image_layout` (`model.family`,
    `prepare.image_aspect_ratio`) pick the model a fresh stage assembles; the shards were prepared for them.
    `callbacks` are Ray Train's own (`ray.train.UserCallback`, run in its controller process): they see every
    checkpoint report (`{"step", "loss"}` per worker) and every worker failure, e.g. to alert on a stalled or
    failing stage."""
    config = LoopConfig(
        stage_name=stage_name, stage=stage, scaling=scaling, shards=tuple(shards), plan_index=plan_index,
        output_dir=stage_dir, init_from=init_from, vision_path=vision_path, llm_path=llm_path, family=family,
        image_layout=image_layout, template=template, save_model=save_model, start_time=time.time())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config},  # Ray Train passes the loop a dict
        scaling_config=scaling_config(scaling),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name or stage_name,
            storage_path=storage.join(stage_dir, "ray"),
            failure_config=FailureConfig(max_failures=stage.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=stage.keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.metrics or {}
