"""A training stage survives failures: a worker killed (SIGKILL) after checkpoint k restarts the worker group from
checkpoint k (step counter continued, not restarted); a run that fails outright resumes from its last checkpoint
when run again (what a restarted driver does). Real Ray Train + DeepSpeed ZeRO-3 on 2 CPU workers, with LoRA and
text-only micro-batches, on a tiny model and token rows written straight to a parquet shard (the prepare stage has
its own tests). The failures come from outside the loop: a Ray Train callback kills a worker process
(tests/worker_faults.py); what happened is read from the callback's log and the stage's own metrics.jsonl.
"""
import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from llava_core.config import LoraSettings, ScalingSettings, TrainStageSettings
from tests.training_rows import write_shard

GLOBAL_BATCH, STEPS = 8, 12  # over training_rows.ROWS rows


def text_only_micro_batches(shard, accum, world=2, micro=2):
    """How many micro-batches of the stage's (deterministic) plan hold no image at all."""
    from llava_core.train.batching import BatchPlan

    table = pq.read_table(shard, columns=["length", "num_images"])
    lengths, images = table.column("length").to_numpy(), table.column("num_images").to_numpy()
    plan = BatchPlan(world, micro, accum, seed=0).epoch_plan(lengths, images, 0)
    return sum(int(images[np.concatenate(m)].sum()) == 0 for m in plan)


def test_worker_killed_resumes_from_checkpoint_then_rerun_resumes_after_a_failed_run(
        ray_session, tiny_dataset, tmp_path):
    from ray.train import WorkerGroupError

    from llava_core.train.loop import LoopConfig
    from llava_core.train.trainer import fit, stage_run_config, stage_trainer
    from tests.worker_faults import KillWorkerAfterCheckpoint, read_log

    def run_with(callback):  # the stage as the workflow runs it, plus a Ray Train callback that kills a worker
        run_config = dataclasses.replace(stage_run_config(config, "instruct"), callbacks=[callback])
        return fit(stage_trainer(config, run_config))

    shard = write_shard(tiny_dataset, str(tmp_path / "rows.parquet"))
    assert text_only_micro_batches(shard, GLOBAL_BATCH // 4) > 0  # ZeRO-3 hangs on these unless handled
    stage = TrainStageSettings(
        dataset="instruct", trainable=["projector", "llm"], lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        global_batch_size=GLOBAL_BATCH, micro_batch_size=2, lr=1e-3, projector_lr=1e-4, zero_stage=3,
        packing=False, checkpoint_every=4, keep_checkpoints=2, max_failures=1, log_every=4)
    scaling = ScalingSettings(num_workers=2, cpus_per_worker=1)
    stage_dir, log = str(tmp_path / "instruct"), str(tmp_path / "faults.jsonl")
    config = LoopConfig("instruct", stage, scaling, (shard,), stage_dir, tiny_dataset["vision"], tiny_dataset["llm"])

    # A worker dies after checkpoint 4 (the group restarts from it), and again after checkpoint 8: the restart
    # budget (max_failures 1) is spent, so the run fails like a dead driver would.
    with pytest.raises(WorkerGroupError) as failed:
        run_with(KillWorkerAfterCheckpoint(log, kill_at=(4, 8)))
    reports = [e for e in read_log(log) if e["event"] == "report"]
    kills = [e for e in reports if e["killed"]]
    assert [(e["step"], bool(e["killed"])) for e in reports] == [(4, True), (8, True)]  # no checkpoint 4 again
    assert str(kills[1]["killed"]) in str(failed.value)  # the run failed because that worker died
    # Running the same stage again (same storage and name) resumes from the last checkpoint, step 8.
    run_with(KillWorkerAfterCheckpoint(log))
    assert [e["step"] for e in read_log(log) if e["event"] == "report"] == [4, 8, 12]

    history = [json.loads(line) for line in open(os.path.join(stage_dir, "metrics.jsonl"))]
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))  # the planned steps, each once
    # Each step was trained by the attempt that was live then: steps 1-4 before the first kill, kept from checkpoint
    # 4 (not trained again); 5-8 by the restarted group; 9-12 by the rerun, which started at checkpoint 8.
    first_kill, second_kill = kills[0]["time"], kills[1]["time"]
    assert all(r["time"] < first_kill for r in history[:4])
    assert all(first_kill < r["time"] < second_kill for r in history[4:8])
    assert all(second_kill < r["time"] for r in history[8:])
    assert all(r["grad_norm"] is not None and r["tokens_per_s"] > 0 for r in history)
    trainable = json.load(open(os.path.join(stage_dir, "trainable.json")))
    assert set(trainable["trained"]) == {"lora", "projector"} and trainable["trained"]["projector"]["lr"] == 1e-4
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(stage_dir, "tensorboard")))
    assert_merged_output_matches_adapter(stage_dir, tiny_dataset, seed=stage.seed)


def assert_merged_output_matches_adapter(stage_dir, tiny_dataset, seed):
    """ZeRO-3 stage output: full weights gathered, LoRA merged; base + adapter gives the same logits."""
    from peft import PeftModel

    from llava_core.model.build import assemble

    merged = LlavaForConditionalGeneration.from_pretrained(os.path.join(stage_dir, "model")).eval()
    torch.manual_seed(seed)  # the loop's fresh projector, rebuilt: the adapter's base model
    base, _ = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    adapter = os.path.join(stage_dir, "adapter")
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()  # the projector too: peft's modules_to_save
    ids = torch.randint(5, 60, (1, 20))
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
        with_adapter.disable_adapter_layers()
        assert not torch.allclose(with_adapter(input_ids=ids).logits, expected, atol=1e-4)  # LoRA changed it


def test_a_killed_preference_stage_resumes_with_the_starting_models_reference(ray_session, tiny_dataset,
                                                                              tiny_llava_dir, tmp_path):
    """The preference stage's reference is the starting model's: a worker killed after checkpoint 4 restarts the
    group from it, and the resumed steps must use the reference sums the checkpoint kept, not ones recomputed from
    the trained weights. So the killed run's every step, and its held-out rewards, equal an uninterrupted run's."""
    from llava_core.config import PreferenceSettings
    from llava_core.data.plan_index import write_plan_index
    from llava_core.train.loop import LoopConfig
    from llava_core.train.trainer import fit, stage_run_config, stage_trainer
    from tests.training_rows import write_pair_shard
    from tests.worker_faults import KillWorkerAfterCheckpoint, read_log

    train, _ = write_pair_shard(tiny_dataset, str(tmp_path / "train.parquet"), rows=24)
    heldout, _ = write_pair_shard(tiny_dataset, str(tmp_path / "heldout.parquet"), rows=6, offset=24)
    for shard in (train, heldout):
        write_plan_index([shard], shard.replace(".parquet", "_index.parquet"))
    stage = PreferenceSettings(dataset="pairs", trainable=["projector", "llm"], global_batch_size=4,
                               micro_batch_size=1, lr=1e-3, zero_stage=3, checkpoint_every=2, max_failures=1,
                               eval_dataset="heldout", log_every=2)
    scaling = ScalingSettings(num_workers=2, cpus_per_worker=1)

    def run(name, kill_at):
        config = LoopConfig("preference", stage, scaling, (train,), str(tmp_path / name), tiny_dataset["vision"],
                            tiny_dataset["llm"], init_from=tiny_llava_dir,
                            plan_index=train.replace(".parquet", "_index.parquet"), eval_shards=(heldout,),
                            eval_plan_index=heldout.replace(".parquet", "_index.parquet"))
        log = str(tmp_path / f"{name}.jsonl")
        run_config = dataclasses.replace(stage_run_config(config, name), callbacks=[KillWorkerAfterCheckpoint(
            log, kill_at)])
        fit(stage_trainer(config, run_config))
        history = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
        return history, json.load(open(os.path.join(config.output_dir, "preference_eval.json"))), read_log(log)

    whole, whole_eval, _ = run("whole", ())
    resumed, resumed_eval, log = run("killed", (4,))
    assert [e["step"] for e in log if e["event"] == "report" and e["killed"]] == [4]
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == list(range(1, 7))
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl")
    for a, b in zip(whole, resumed):
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, abs=1e-5), a["step"]
    assert resumed_eval["pairs"] == whole_eval["pairs"] == 6
    for view in ("seen", "blind"):
        assert resumed_eval[view] == pytest.approx(whole_eval[view], abs=1e-4)
    assert whole[4]["rewards/margins"] != whole[0]["rewards/margins"]  # the steps after the kill trained
