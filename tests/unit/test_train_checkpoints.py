"""Checkpoints and the DeepSpeed settings around them. Resuming reads only what DeepSpeed loads on a rank: its own ZeRO
shards, and the rank-independent files once per node (the end-to-end resume runs in
tests/end_to_end/test_train_failures.py)."""
from llava_core.train.checkpoints import files_for_rank

# A ZeRO-3 checkpoint of 2 ranks in bf16 (DeepSpeed 0.19's names), with the loop's side file
ZERO3 = ["train_state.json", "deepspeed/zero_pp_rank_0_mp_rank_00_model_states.pt",
         "deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt",
         "deepspeed/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
         "deepspeed/zero_pp_rank_10_mp_rank_00_model_states.pt"]
# ZeRO-2 keeps the (trained) weights in one file every rank loads
ZERO2 = ["train_state.json", "deepspeed/mp_rank_00_model_states.pt",
         "deepspeed/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_a_rank_fetches_its_own_shards_and_its_nodes_first_rank_the_shared_files():
    assert files_for_rank(ZERO3, 1, fetches_shared=False) == [
        "deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert files_for_rank(ZERO3, 0, fetches_shared=True) == [
        "train_state.json", "deepspeed/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "deepspeed/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]  # not rank 10's
    assert files_for_rank(ZERO2, 1, fetches_shared=True) == [
        "train_state.json", "deepspeed/mp_rank_00_model_states.pt",
        "deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_the_deepspeed_config_of_a_bf16_zero3_stage_across_nodes():
    """fp32 gradient accumulation and reduction under bf16; ZeRO-3 prefetches a whole decoder layer; hpZ when asked."""
    from llava_core.config import TrainStageSettings
    from llava_core.train.engine import deepspeed_config

    stage = TrainStageSettings(zero_stage=3, zero_hpz_partition_size=8, global_batch_size=128, micro_batch_size=4)
    config = deepspeed_config(stage, 32, use_gpu=True, hidden_size=4096, layer_params=202_383_360)
    assert config["bf16"] == {"enabled": True} and config["gradient_accumulation_steps"] == 1
    assert config["data_types"] == {"grad_accum_dtype": "fp32"} and config["communication_data_type"] == "fp32"
    zero = config["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 202_383_360  # one Vicuna-7B decoder layer
    assert zero["zero_hpz_partition_size"] == 8
    assert zero["stage3_param_persistence_threshold"] == 40_960
    cpu = deepspeed_config(stage, 32, use_gpu=False)  # fp32 on CPU: nothing to accumulate in a wider type
    assert cpu["bf16"] == {"enabled": False} and "data_types" not in cpu
