"""The align hand-off under ZeRO-3: only the projector is gathered and written, as the official `mm_projector.bin`
(real Ray Train + DeepSpeed on 2 CPU workers), and it loads into a fresh model with exactly the trained values."""
import os

import torch

from llava_core.config import ScalingSettings, TrainStageSettings
from llava_core.data.plan_index import write_plan_index
from tests.training_rows import write_shard


def test_a_projector_only_stage_under_zero3_writes_mm_projector_bin(ray_session, tiny_dataset, tmp_path):
    from llava_core.model.build import assemble, load_official_projector
    from llava_core.train.loop import LoopConfig
    from llava_core.train.trainer import run_training_stage

    shard = write_shard(tiny_dataset, str(tmp_path / "rows.parquet"), rows=32)
    index = str(tmp_path / "plan_index.parquet")  # the ranks read the plan from it, as after a prepare
    write_plan_index([shard], index)
    stage = TrainStageSettings(dataset="align", trainable=["projector"], global_batch_size=8, micro_batch_size=2,
                               lr=1e-2, zero_stage=3, log_every=4)
    stage_dir = str(tmp_path / "align")
    run_training_stage(LoopConfig("align", stage, ScalingSettings(num_workers=2, cpus_per_worker=1), (shard,),
                                  stage_dir, tiny_dataset["vision"], tiny_dataset["llm"], template="plain",
                                  save_model=False, plan_index=index), "align")
    assert not os.path.exists(os.path.join(stage_dir, "model"))
    saved = torch.load(os.path.join(stage_dir, "mm_projector.bin"))
    assert set(saved) == {
        f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    torch.manual_seed(stage.seed)  # the projector every rank started from
    model, _ = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    initial = model.model.multi_modal_projector.linear_1.weight.detach().clone()
    assert saved["model.mm_projector.0.weight"].numel() > 0  # gathered, not a ZeRO-3 shard placeholder
    assert not torch.equal(saved["model.mm_projector.0.weight"], initial)  # trained
    load_official_projector(model, os.path.join(stage_dir, "mm_projector.bin"))
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, saved["model.mm_projector.0.weight"])
