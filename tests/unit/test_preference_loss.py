"""The preference losses (llava_core/train/preference.py): hand-computed values for each loss, the SFT term and the
metrics; TRL's code transcribed on token-level tensors; log-probs equal to a naive full log-softmax; gradients only
through the policy."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llava_core.train.loss import supervised_positions, token_log_probs
from llava_core.train.preference import (
    PairLogps,
    pair_losses,
    preference_loss,
    supervised_sequence_logps,
)


def sequence_logps(logits, labels, chunk_bytes=None):
    """The loop's path from full logits: the supervised positions' rows only, as the model returns them."""
    kwargs = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    return supervised_sequence_logps(logits[supervised_positions(labels)], labels, **kwargs)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log(sigmoid(-x))


def pair(pc, pr, rc, rr, nc, nr, grad: bool = False) -> PairLogps:
    policy = [torch.tensor(v, dtype=torch.float64, requires_grad=grad) for v in (pc, pr)]
    reference = [torch.tensor(v, dtype=torch.float64) for v in (rc, rr)]
    return PairLogps(*policy, *reference, torch.tensor(nc), torch.tensor(nr))


# One pair worked out by hand: policy chosen/rejected -10/-12, reference -11/-11, answers of 2 and 4 tokens.
# log-ratios: chosen +1, rejected -1; summed margin z = 2; per-token margin h = 1/2 - (-1/4) = 0.75.
HAND = pair([-10.0], [-12.0], [-11.0], [-11.0], [2], [4])


def test_sigmoid_loss_by_hand():
    beta = 0.5  # beta * z = 1
    assert float(pair_losses(HAND, "sigmoid", beta)[0]) == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-12)


def test_sigmoid_label_smoothing_by_hand():
    # conservative DPO: 0.9 * -log(sigmoid(1)) + 0.1 * -log(sigmoid(-1))
    expected = 0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))
    assert float(pair_losses(HAND, "sigmoid", 0.5, label_smoothing=0.1)[0]) == pytest.approx(expected, rel=1e-12)


def test_ipo_loss_by_hand():
    # (h - 1 / (2 * beta))**2 = (0.75 - 1)**2
    assert float(pair_losses(HAND, "ipo", 0.5)[0]) == pytest.approx(0.0625, rel=1e-12)


def test_sigmoid_norm_loss_by_hand():
    # -log(sigmoid(beta * h)) = log(1 + exp(-0.375))
    assert float(pair_losses(HAND, "sigmoid_norm", 0.5)[0]) == pytest.approx(math.log(1 + math.exp(-0.375)))


def test_sft_term_and_weights_by_hand():
    # two pairs; the chosen answers: 3 tokens summing to -6 and 1 token at -2: mean token NLL (6 + 2) / 4 = 2
    logps = pair([-6.0, -2.0], [-7.0, -2.0], [-6.0, -3.0], [-6.0, -2.0], [3, 1], [5, 2])
    # margins z: (0 - (-1)) = 1 and (1 - 0) = 1; beta 1: each pair -log(sigmoid(1))
    dpo = math.log(1 + math.exp(-1.0))
    result = preference_loss(logps, "sigmoid", beta=1.0, dpo_alpha=0.5, gamma=2.0)
    assert float(result.sft) == pytest.approx(2.0)
    assert float(result.preference) == pytest.approx(dpo)
    assert float(result.loss) == pytest.approx(0.5 * dpo + 2.0 * 2.0)
    # LLaVA-NeXT's published scripts: dpo_alpha 1, gamma 0: the DPO term alone
    assert float(preference_loss(logps, "sigmoid", beta=1.0).loss) == pytest.approx(dpo)


def test_sft_term_is_llava_next_cross_entropy():
    """LLaVA-NeXT's get_sft_loss is nn.CrossEntropyLoss() over the chosen rows' shifted labels (a token mean)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 4, 1, 7, -100], [-100, 2, 3, 8, 0, 5]])
    theirs = torch.nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1))
    sums, counts = sequence_logps(logits, labels)
    zeros = torch.zeros(2, dtype=torch.float64)
    ours = preference_loss(PairLogps(sums, zeros, zeros, zeros, counts, counts), gamma=1.0).sft
    assert float(ours) == pytest.approx(float(theirs), rel=1e-10)


def test_metrics_by_hand():
    logps = pair([-10.0, -5.0], [-12.0, -4.0], [-11.0, -5.0], [-11.0, -5.0], [2, 3], [4, 1])
    metrics = preference_loss(logps, beta=0.5).metrics
    # rewards beta * ratio: chosen 0.5 and 0, rejected -0.5 and 0.5; the first pair is ranked right, the second not
    assert float(metrics["rewards/chosen"]) == pytest.approx(0.25)
    assert float(metrics["rewards/rejected"]) == pytest.approx(0.0)
    assert float(metrics["rewards/accuracies"]) == 0.5
    assert float(metrics["rewards/margins"]) == pytest.approx((1.0 + -0.5) / 2)
    assert float(metrics["logps/chosen"]) == -7.5 and float(metrics["logps/rejected"]) == -8.0
    # k1 per token: log-ratios 1 + 0 - 1 + 1 over 2 + 3 + 4 + 1 tokens
    assert float(metrics["kl"]) == pytest.approx(0.1)
    assert all(not m.requires_grad for m in metrics.values())


# TRL's code, written out on its own inputs: the token log-probs of a [chosen..., rejected...] batch and its
# completion mask, as trl/trainer/dpo_trainer.py `_compute_loss` (f2cd577, lines 1346-1556) takes them; sigmoid with
# label smoothing as TRL <= 0.28 `dpo_loss` (lines 1152-1156 at a68fb896f).
def trl_losses(per_token_logps, ref_per_token_logps, completion_mask, loss_type, beta, label_smoothing=0.0):
    per_token_logps = per_token_logps * completion_mask
    ref_per_token_logps = ref_per_token_logps * completion_mask
    chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)
    ref_chosen_logps, ref_rejected_logps = ref_per_token_logps.sum(dim=1).chunk(2, dim=0)
    chosen_scores = chosen_logps - ref_chosen_logps
    rejected_scores = rejected_logps - ref_rejected_logps
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        return (-F.logsigmoid(beta * delta_score) * (1 - label_smoothing)
                - F.logsigmoid(-beta * delta_score) * label_smoothing)
    chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
    chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
    rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
    if loss_type == "ipo":
        return (chosen_avg_score - rejected_avg_score - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * (chosen_avg_score - rejected_avg_score))  # sigmoid_norm


@pytest.mark.parametrize("loss_type,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.2), ("ipo", 0.1, 0.0),
                                                      ("ipo", 1.0, 0.0), ("sigmoid_norm", 2.0, 0.0)])
def test_matches_trl_formula(loss_type, beta, smoothing):
    g = torch.Generator().manual_seed(7)
    pairs, width = 5, 9
    policy = -3 * torch.rand(2 * pairs, width, generator=g, dtype=torch.float64)
    reference = -3 * torch.rand(2 * pairs, width, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, width + 1, (2 * pairs,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).double()
    expected = trl_losses(policy, reference, mask, loss_type, beta, smoothing)
    sums, ref_sums = (policy * mask).sum(1), (reference * mask).sum(1)
    logps = PairLogps(*sums.chunk(2), *ref_sums.chunk(2), *lengths.chunk(2))
    ours = pair_losses(logps, loss_type, beta, smoothing)
    assert torch.allclose(ours, expected, rtol=1e-12, atol=1e-12)
    assert float(expected.std()) > 0  # the pairs differ: the comparison is not of one repeated number


def naive_sequence_logps(logits, labels):
    """LLaVA-NeXT's get_batch_logps (trl/trainer/dpo_trainer.py:796-831): full log_softmax, gather, mask, sum."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != -100
    labels[labels == -100] = 0
    per_token = torch.gather(logits.float().log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    return (per_token * loss_mask).sum(-1), loss_mask.sum(-1)


def random_output(seed=0, dtype=torch.float32):
    """A tiny model's output: three right-padded rows of prompt (unsupervised), answer (supervised) and padding."""
    g = torch.Generator().manual_seed(seed)
    batch, width, vocab = 3, 8, 13
    logits = (4 * torch.randn(batch, width, vocab, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, width), generator=g)
    for row, (prompt, end) in enumerate([(2, 8), (4, 6), (1, 3)]):
        labels[row, :prompt] = -100
        labels[row, end:] = -100
    return logits, labels


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 13 * 3, 2**20])  # one row a chunk, three rows, all at once
def test_sequence_logps_equal_naive_log_softmax(chunk_bytes):
    logits, labels = random_output()
    sums, counts = sequence_logps(logits, labels, chunk_bytes=chunk_bytes)
    (grad,) = torch.autograd.grad(sums.sum(), logits)
    naive_sums, naive_counts = naive_sequence_logps(logits, labels)
    (naive_grad,) = torch.autograd.grad(naive_sums.sum(), logits)
    assert counts.tolist() == naive_counts.tolist() == [6, 2, 2]
    assert torch.allclose(sums, naive_sums, atol=1e-5) and float(sums.detach().abs().min()) > 0.1
    assert torch.allclose(grad, naive_grad, atol=1e-6)


def test_sequence_logps_from_kept_logits_only():
    """The model path: logits computed only at the supervised positions (`logits_to_keep`), bf16 upcast per chunk."""
    logits, labels = random_output(seed=1, dtype=torch.bfloat16)
    kept = logits[supervised_positions(labels)].detach()
    sums, counts = supervised_sequence_logps(kept, labels, chunk_bytes=4 * 13 * 2)
    naive_sums, naive_counts = naive_sequence_logps(logits.detach(), labels)
    assert kept.shape[0] == 10 and counts.tolist() == naive_counts.tolist()
    assert torch.allclose(sums, naive_sums, atol=1e-5)
    with pytest.raises(ValueError, match="9 logit rows for 10 supervised positions"):
        supervised_sequence_logps(kept[:9], labels)


def test_nothing_supervised_still_has_a_graph():
    logits = torch.randn(0, 5, requires_grad=True)
    out = token_log_probs(logits, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm"])
def test_gradient_reaches_the_policy_only(loss_type):
    logps = pair([-10.0, -3.0], [-12.0, -4.0], [-11.0, -3.5], [-11.0, -3.0], [2, 3], [4, 1], grad=True)
    reference = [t.clone().requires_grad_() for t in (logps.reference_chosen, logps.reference_rejected)]
    logps = logps._replace(reference_chosen=reference[0], reference_rejected=reference[1])
    preference_loss(logps, loss_type, beta=0.5, gamma=1.0).loss.backward()
    assert reference[0].grad is None and reference[1].grad is None
    assert float(logps.policy_chosen.grad.abs().min()) > 0 and float(logps.policy_rejected.grad.abs().min()) > 0
    assert bool((logps.policy_chosen.grad < 0).all())  # raising the chosen answer's likelihood lowers the loss


def test_sigmoid_gradient_by_hand():
    # d/dpc of mean(-log(sigmoid(beta * z))) over one pair = -beta * sigmoid(-beta * z) = -0.5 * sigmoid(-1)
    logps = pair([-10.0], [-12.0], [-11.0], [-11.0], [2], [4], grad=True)
    preference_loss(logps, beta=0.5).loss.backward()
    assert float(logps.policy_chosen.grad[0]) == pytest.approx(-0.5 / (1 + math.e))
    assert float(logps.policy_rejected.grad[0]) == pytest.approx(0.5 / (1 + math.e))


def test_step_zero_is_log_two():
    """Policy equal to the reference (the first step, with a faithful reference pass): every pair at log 2."""
    logps = pair([-4.0, -9.0], [-5.0, -2.0], [-4.0, -9.0], [-5.0, -2.0], [3, 4], [2, 2])
    result = preference_loss(logps, beta=0.1)
    assert float(result.preference) == pytest.approx(math.log(2))
    assert float(result.metrics["rewards/margins"]) == 0 and float(result.metrics["kl"]) == 0


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown preference loss 'simpo'"):
        pair_losses(HAND, "simpo", 0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        pair_losses(HAND, "sigmoid", 0.0)
    with pytest.raises(ValueError, match="label_smoothing must lie"):
        pair_losses(HAND, "sigmoid", 0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        pair_losses(HAND, "ipo", 0.1, label_smoothing=0.1)
