"""Resuming reads only what DeepSpeed loads on a rank: its own ZeRO shards, and the rank-independent files once per
node (the end-to-end resume runs in tests/test_train_failures.py)."""
import pytest

from llava_core.train.checkpoints import files_for_rank

pytestmark = pytest.mark.unit

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
