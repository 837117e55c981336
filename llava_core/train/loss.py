"""The next-token loss without vocabulary-sized fp32 logits for the whole sequence.

transformers computes logits at every position and upcasts all of them to fp32 for the cross-entropy: at OneVision's
32K positions and Qwen2's 152K vocabulary that is ~20 GB a copy, ~50 GB with the softmax and its gradient, on top of
ZeRO-3's state. Two changes, same loss and gradient:
- the lm_head runs only where a label is supervised (transformers' boolean `logits_to_keep`, 5.23 on): the prompt,
  image and padding positions (~85% of a LLaVA-1.5 row, over 90% of a OneVision one) get no logits at all, which also
  saves their share of the lm_head's FLOPs;
- the fp32 cross-entropy runs over chunks of those rows, each chunk recomputed in backward (non-reentrant
  checkpointing): at most one chunk's fp32 logits, softmax and gradient are alive at a time (`CHUNK_BYTES`).
What stays: the supervised rows' logits in the training dtype and their gradient (a 2K-token answer under Qwen2: 0.6 GB
each in bf16). A fused linear cross-entropy kernel (Liger's) would drop those too; it needs the hidden states before
the lm_head, which transformers' forward does not return, and a ZeRO-3-gathered lm_head weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llava_core.data.templates import IGNORE_INDEX

CHUNK_BYTES = 512 * 2**20  # fp32 logits per chunk; its softmax and gradient take as much again each


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is supervised (the position predicts the label one to its right), as a bool mask."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Each row's log-prob of its target token, in fp32 (or finer), from `logits` rows (any dtype), one chunk of rows
    at a time, each chunk recomputed in backward: one chunk's fp32 logits, softmax and gradient alive at most."""
    if logits.shape[0] == 0:  # nothing supervised: empty, with a graph, since backward must still run on every rank
        return logits.float().sum(-1)
    rows = max(1, chunk_bytes // (4 * logits.shape[-1]))
    return torch.cat([checkpoint(_chunk_log_probs, logits[start:start + rows], targets[start:start + rows],
                                 use_reentrant=False)
                      for start in range(0, logits.shape[0], rows)])


def _chunk_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16's softmax is too coarse
    return -F.cross_entropy(logits, targets, reduction="none")


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """The fp32 cross-entropy of `logits` rows (any dtype) against `targets`, summed (`token_log_probs`' chunks)."""
    return -token_log_probs(logits, targets, chunk_bytes).sum()


def supervised_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits at the supervised positions only, (positions, vocabulary), in row-major order; their mask) of the
    model's forward over `batch` (its `labels` say which positions are supervised)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep = supervised_positions(batch["labels"])
    # no cache: with one, packed rows would attend across their samples
    return model(**inputs, use_cache=False, logits_to_keep=keep).logits, keep


def next_token_loss(model, batch: dict, num_items_in_batch: torch.Tensor | None = None) -> torch.Tensor:
    """The model's causal LM loss over `batch` (its `labels` as transformers reads them): the summed token losses
    divided by `num_items_in_batch` when given (token normalisation), else their mean (transformers' two rules)."""
    logits, keep = supervised_logits(model, batch)
    total = summed_cross_entropy(logits, batch["labels"][:, 1:][keep[:, :-1]])
    divisor = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    return total / divisor
