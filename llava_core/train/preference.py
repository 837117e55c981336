"""Preference losses (DPO and its named variants) on per-sequence summed log-probabilities, as pure torch functions.

A pair is one prompt with a chosen and a rejected answer. With summed answer log-probs under the policy (pc, pr) and
under the frozen starting model, the reference (rc, rr), and the answers' token counts (nc, nr):
- `sigmoid` (DPO; TRL `DPOConfig.loss_type="sigmoid"`): z = (pc - rc) - (pr - rr),
  loss = -(1 - eps) * logsigmoid(beta * z) - eps * logsigmoid(-beta * z). eps is `label_smoothing` (conservative DPO,
  TRL PR #1035): the form of TRL <= 0.28 (trl/trainer/dpo_trainer.py:1152-1156 at a68fb896f, `dpo_loss`) and
  of the TRL copy LLaVA-NeXT trains with (LLaVA-NeXT trl/trainer/dpo_trainer.py:765-766). TRL 0.29 dropped eps
  from `sigmoid` (its smoothed forms are now `robust` and `exo_pair`); at eps = 0, the default, the two agree
  (TRL main at f2cd577, trl/trainer/dpo_trainer.py:1434-1435).
- `ipo` (TRL `"ipo"`, trl/trainer/dpo_trainer.py:1440-1451 at f2cd577): on length-averaged log-ratios,
  h = (pc - rc) / nc - (pr - rr) / nr, loss = (h - 1 / (2 * beta))**2. TRL averages per answer token because the
  summed form makes the square grow with length (its comment: confirmed with the IPO authors); LLaVA-NeXT's copy
  does the same with `average_log_prob=True` for `ipo` (LLaVA-NeXT trl/trainer/dpo_trainer.py:769-771, 876).
- `sigmoid_norm` (TRL `"sigmoid_norm"`, trl/trainer/dpo_trainer.py:1551-1556 at f2cd577): DPO on the same
  length-averaged h, loss = -logsigmoid(beta * h). This is the length-normalised DPO a user asks TRL for by name;
  TRL's other length answers, LD-DPO's `ld_alpha` (needs per-token log-probs split at the shorter answer's length)
  and SimPO (reference-free, in CPOTrainer), do not fit reference sums precomputed per answer. On averaged
  log-probs a useful beta is larger than DPO's 0.1 (SimPO uses 2 to 2.5).
Beside the preference term, LLaVA-NeXT adds an SFT term on the chosen answer: total = dpo_alpha * mean(preference
loss) + gamma * sft, where sft is `nn.CrossEntropyLoss()` over the chosen answers' supervised tokens, i.e. their mean
token NLL over the whole micro-batch (LLaVA-NeXT trl/trainer/dpo_trainer.py:833-844 `get_sft_loss`, 950-957;
flags `--dpo_alpha`, `--gamma` in llava/train/train_dpo.py:164-166). Note the names: `dpo_alpha` weighs the DPO
term and `gamma` the SFT term; both official scripts (scripts/train/dpo_ov7b.sh, dpo.sh) pass `--dpo_alpha 1.0
--gamma 0`, so the published OneVision DPO recipe has no SFT term (train_dpo.py's own default is gamma 1.0).

Metrics are TRL's (trl/trainer/dpo_trainer.py:1633-1653 at f2cd577): rewards/chosen = beta * (pc - rc),
rewards/rejected = beta * (pr - rr), rewards/accuracies = share of pairs with chosen > rejected reward,
rewards/margins = their difference, logps/chosen, logps/rejected (policy sums); all batch means. `kl` is ours: the
policy's log-ratio to the reference per answer token, sum over chosen and rejected tokens of (log p - log ref) / their
count (the k1 estimator). Only sequence sums are kept per answer, which rules out per-token k2/k3; and since the
answers are the data's, not samples of the policy, no estimator is an unbiased KL(policy || ref) here: k1 can go
negative, and does when DPO lowers both answers' likelihood (a known DPO drift that a clamped figure would hide).

Reference log-probs are inputs, computed once by a forward pass of the starting model over the prepared pairs before
training, not by a frozen second model beside the policy. At OneVision-Qwen2-7B (8.0B parameters: Qwen2-7B 7.6B,
SigLIP-so400m 0.4B) on 8x H100 under ZeRO-3 a frozen partitioned copy costs 16 GB of bf16 weights / 8 = 2 GB per GPU
that stays, its own ZeRO-3 gather and prefetch buffers while it runs, and one more forward per step: about a third of
the policy's forward + backward (a quarter with activation checkpointing's recomputation). The precomputed pass
costs the same forward once per pair (the official recipe runs one epoch, so no extra compute) and keeps 8 bytes per
pair (two fp32 sums) beside the prepared rows; the training step holds only the policy, as SFT does, and a rerun, a
resume or a beta sweep reuses the sums. It must see exactly the training inputs (the same token ids and pixel
values: prepare is deterministic) in eval mode, so that at step 0 every log-ratio is 0 and the loss is log 2.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from llava_core.schema import PREFERENCE_LOSSES as LOSS_TYPES
from llava_core.train.loss import CHUNK_BYTES, supervised_positions, token_log_probs


class PairLogps(NamedTuple):
    """Per pair (shape (pairs,)): summed answer log-probs under the policy and the reference, and answer lengths."""
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


class PreferenceLoss(NamedTuple):
    loss: torch.Tensor  # dpo_alpha * preference + gamma * sft: what backward runs on
    preference: torch.Tensor  # the mean per-pair preference loss, unweighted
    sft: torch.Tensor  # the chosen answers' mean token NLL, unweighted
    metrics: dict[str, torch.Tensor]  # detached batch means, TRL's names


def supervised_sequence_logps(kept_logits: torch.Tensor, labels: torch.Tensor,
                              chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch row: the summed log-prob of its supervised tokens and their count, from `kept_logits`, the logits at
    `supervised_positions(labels)` only, in row-major order (what the model returns with that mask as
    `logits_to_keep`, as loss.next_token_loss asks for). One sample per row: packed rows would be summed together."""
    keep = supervised_positions(labels)
    targets = labels[:, 1:][keep[:, :-1]]  # the position t predicts the label at t + 1
    if kept_logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{kept_logits.shape[0]} logit rows for {targets.shape[0]} supervised positions")
    token_logps = token_log_probs(kept_logits, targets, chunk_bytes)
    row_of_token = keep.nonzero()[:, 0]
    sums = token_logps.new_zeros(labels.shape[0]).index_add(0, row_of_token, token_logps)
    return sums, keep.sum(dim=1)


def preference_loss(logps: PairLogps, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                    dpo_alpha: float = 1.0, gamma: float = 0.0) -> PreferenceLoss:
    """The weighted loss of a batch of pairs, its two terms and TRL's metrics (formulas in the module docstring)."""
    per_pair = pair_losses(logps, loss_type, beta, label_smoothing)
    sft = chosen_nll(logps)
    preference = per_pair.mean()
    return PreferenceLoss(dpo_alpha * preference + gamma * sft, preference, sft, reward_metrics(logps, beta))


def pair_losses(logps: PairLogps, loss_type: str, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """The per-pair preference loss of `loss_type`, shape (pairs,)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown preference loss {loss_type!r}: one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {loss_type}")
    # the reference is frozen: detached, so no gradient reaches it even when handed a tensor that has one
    chosen_ratio = logps.policy_chosen - logps.reference_chosen.detach()
    rejected_ratio = logps.policy_rejected - logps.reference_rejected.detach()
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    h = chosen_ratio / logps.chosen_tokens.clamp(min=1) - rejected_ratio / logps.rejected_tokens.clamp(min=1)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * h)  # sigmoid_norm


def chosen_nll(logps: PairLogps) -> torch.Tensor:
    """The chosen answers' mean token NLL over the batch: LLaVA-NeXT's `nn.CrossEntropyLoss()` on them, from sums."""
    return -logps.policy_chosen.sum() / logps.chosen_tokens.sum().clamp(min=1)


def reward_metrics(logps: PairLogps, beta: float) -> dict[str, torch.Tensor]:
    """TRL's DPO metrics and the per-token k1 KL of the policy from the reference (see the module docstring)."""
    with torch.no_grad():
        chosen_ratio = logps.policy_chosen - logps.reference_chosen
        rejected_ratio = logps.policy_rejected - logps.reference_rejected
        chosen, rejected = beta * chosen_ratio, beta * rejected_ratio
        tokens = (logps.chosen_tokens + logps.rejected_tokens).sum().clamp(min=1)
        kl = (chosen_ratio.sum() + rejected_ratio.sum()) / tokens
        return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                "rewards/accuracies": (chosen > rejected).float().mean(), "rewards/margins": (chosen - rejected).mean(),
                "logps/chosen": logps.policy_chosen.mean(), "logps/rejected": logps.policy_rejected.mean(), "kl": kl}
