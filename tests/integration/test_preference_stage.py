"""The preference stage on real Ray Train + DeepSpeed (ZeRO-3, 2 CPU workers), from an exported LLaVA: the reference
pass makes the first step's DPO loss exactly log 2, and the held-out rewards it reports are those an independent
forward pass of the starting model and of the stage's output model gives (plain transformers, one pair at a time, no
padding, its own log-softmax)."""
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from llava_core.config import PreferenceSettings, ScalingSettings
from llava_core.data.plan_index import write_plan_index
from tests.training_rows import write_pair_shard

BETA = 0.1


def summed_answer_logps(model_dir: str, shard: str) -> np.ndarray:
    """(pairs, 2): each pair's chosen and rejected summed log-prob of its supervised tokens, one sequence at a time."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for row in pq.read_table(shard).to_pylist():
        crop = row["pixel_values"]
        size = int(math.isqrt(len(crop["uint8"]) // 3))
        pixels = np.frombuffer(crop["uint8"], dtype=np.uint8).reshape(1, 3, size, size).astype(np.float32)
        pixels = pixels * np.asarray(crop["scale"])[:, None, None] + np.asarray(crop["offset"])[:, None, None]
        sums = []
        for ids, labels in ((row["input_ids"], row["labels"]), (row["rejected_input_ids"], row["rejected_labels"])):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(pixels)).logits[0]
            logps = torch.log_softmax(logits.double(), -1)
            sums.append(sum(float(logps[t - 1, labels[t]]) for t in range(1, len(ids)) if labels[t] != -100))
        out.append(sums)
    return np.asarray(out)


@pytest.fixture(scope="module")
def pairs(tiny_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    train, _ = write_pair_shard(tiny_dataset, str(folder / "train.parquet"), rows=16)
    heldout, _ = write_pair_shard(tiny_dataset, str(folder / "heldout.parquet"), rows=10, offset=16)
    for shard in (train, heldout):
        write_plan_index([shard], shard.replace(".parquet", "_index.parquet"))
    return train, heldout


def test_first_step_is_log_2_and_held_out_rewards_match_an_independent_forward(ray_session, tiny_dataset,
                                                                               tiny_llava_dir, pairs, tmp_path):
    from llava_core.train.loop import LoopConfig
    from llava_core.train.trainer import run_training_stage

    train, heldout = pairs
    stage = PreferenceSettings(dataset="pairs", trainable=["projector", "llm"], global_batch_size=4,
                               micro_batch_size=1, lr=1e-3, warmup_ratio=0.0, zero_stage=3, beta=BETA,
                               eval_dataset="heldout", log_every=1)
    stage_dir = str(tmp_path / "preference")
    run_training_stage(LoopConfig("preference", stage, ScalingSettings(num_workers=2, cpus_per_worker=1), (train,),
                                  stage_dir, tiny_dataset["vision"], tiny_dataset["llm"], init_from=tiny_llava_dir,
                                  plan_index=train.replace(".parquet", "_index.parquet"), eval_shards=(heldout,),
                                  eval_plan_index=heldout.replace(".parquet", "_index.parquet")), "preference")
    history = [json.loads(line) for line in open(os.path.join(stage_dir, "metrics.jsonl"))]
    assert len(history) == 4  # 16 pairs, 4 a step
    first = history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is the reference before any update
    assert first["rewards/accuracies"] == 0.0 and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["preference_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[-1]["rewards/margins"] != 0.0  # the updates moved the policy off the reference

    report = json.load(open(os.path.join(stage_dir, "preference_eval.json")))
    reference = summed_answer_logps(tiny_llava_dir, heldout)
    policy = summed_answer_logps(os.path.join(stage_dir, "model"), heldout)
    rewards = BETA * (policy - reference)
    assert report["pairs"] == 10
    seen = report["seen"]
    assert seen["reference_prefers_chosen"] == pytest.approx(np.mean(reference[:, 0] > reference[:, 1]), abs=1e-4)
    assert seen["policy_prefers_chosen"] == pytest.approx(np.mean(policy[:, 0] > policy[:, 1]), abs=1e-4)
    assert seen["reward_accuracy"] == pytest.approx(np.mean(rewards[:, 0] > rewards[:, 1]), abs=1e-4)
    assert seen["reward_margin"] == pytest.approx(np.mean(rewards[:, 0] - rewards[:, 1]), abs=1e-3)
    assert seen["reward_margin"] != report["blind"]["reward_margin"]  # the blind view sees other inputs
