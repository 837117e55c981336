"""The preference stage's passes over the DeepSpeed engine (inside Ray Train workers): the reference pass before
training, one optimizer step of the preference loss, and the held-out pairs' rewards after the last step.

A collated micro-batch of n pairs holds 2n sequences, the chosen then the rejected (`batching.collate_pairs`), plus
a blank image row when it has no image (`engine.model_inputs`); the n pairs are the first 2n rows.

The reference is the starting model's summed answer log-probs, computed once in eval mode over exactly the
micro-batches each rank trains on, in plan order (`train/preference.py` says why a pass and not a second model). The
same batches through the same weights give the same sums, so at step 0 every log-ratio is 0 and DPO's loss is
log 2. Every rank keeps all ranks' sums (8 bytes a pair per answer: 1.6 MB for 100K pairs); rank 0 writes them into
each checkpoint (`REFERENCE_FILE`), and a resumed stage reads them back, since the weights it resumes with are no
longer the reference.
"""
from __future__ import annotations

import io
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch

from llava_core.schema import PreferenceSettings
from llava_core.train.engine import model_inputs, on_device
from llava_core.train.loss import supervised_logits
from llava_core.train.preference import PairLogps, preference_loss, supervised_sequence_logps
from llava_core.train.streaming import BatchPrefetcher

REFERENCE_FILE = "reference_logps.npz"
VIEWS = ("seen", "blind")  # held-out pairs with their images, and with the images blanked


class PairBatch(NamedTuple):
    batch: dict  # the collated model inputs
    pairs: int  # n: the first n rows are the chosen answers, the next n the rejected ones


def answer_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `batch`: the summed log-prob of its supervised tokens (fp32 or finer) and their count."""
    logits, _ = supervised_logits(model, batch)
    return supervised_sequence_logps(logits, batch["labels"])


def pair_columns(values: torch.Tensor, pairs: int) -> torch.Tensor:
    """(pairs, 2): each pair's chosen and rejected value, from per-row values."""
    return torch.stack([values[:pairs], values[pairs:2 * pairs]], dim=1)


def blanked(batch: dict) -> dict:
    """The batch with every image and video blanked to the processor's mean colour (0 once normalised), at the same
    shape, so each image still expands to its own token count: the image-blind baseline."""
    return {k: torch.zeros_like(v) if k in ("pixel_values", "pixel_values_videos") and v is not None else v
            for k, v in batch.items()}


@torch.no_grad()
def reference_pass(engine, batches: Iterable[PairBatch], device) -> torch.Tensor:
    """(micro-batches, pairs, 2) fp64: the model's chosen and rejected sums over `batches`, in eval mode (no
    dropout, no recomputation), the model back in train mode after."""
    engine.eval()
    try:
        sums = []
        for batch, pairs in batches:
            logps, _ = answer_logps(engine, on_device(batch, device))
            sums.append(pair_columns(logps, pairs).double())
    finally:
        engine.train()
    return torch.stack(sums) if sums else torch.zeros((0, 0, 2), dtype=torch.float64, device=device)


def gather_reference(mine: torch.Tensor) -> torch.Tensor:
    """(world, micro-batches, pairs, 2): every rank's reference sums (each rank runs the same number of
    micro-batches of the same size), on every rank, gathered on the training device."""
    world = torch.distributed.get_world_size()
    everyone = mine.new_empty((world * mine.shape[0], *mine.shape[1:]))  # ranks one after another on dim 0
    torch.distributed.all_gather_into_tensor(everyone, mine.contiguous())
    return everyone.reshape(world, *mine.shape)


def preference_step(engine, batches: list[PairBatch], reference: torch.Tensor, s: PreferenceSettings,
                    device) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward and backward of the preference loss over this rank's micro-batches of one optimizer step, then
    DeepSpeed's step; `reference` holds their reference sums, (micro-batches, pairs, 2). Each micro-batch's loss is
    its pairs' mean; DeepSpeed averages the micro-batches' gradients over accumulation and ranks, as TRL's trainer
    does. Returns ((summed micro-batch losses, the step's micro-batches over all ranks), summed per-micro-batch
    metrics: TRL's, `preference_loss` and `sft_loss`)."""
    total = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = {}
    for (batch, pairs), ref in zip(batches, reference):
        logps, counts = answer_logps(engine, on_device(batch, device))
        policy, tokens, ref = pair_columns(logps, pairs), pair_columns(counts, pairs), ref.to(logps.dtype)
        out = preference_loss(PairLogps(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], tokens[:, 0], tokens[:, 1]),
                              s.loss_type, s.beta, s.label_smoothing, s.dpo_alpha, s.gamma)
        engine.backward(out.loss)
        engine.step()
        total += out.loss.detach().float()
        for key, value in {**out.metrics, "preference_loss": out.preference, "sft_loss": out.sft}.items():
            metrics[key] = metrics.get(key, 0.0) + value.detach().double()
    micro_batches = torch.tensor(float(len(batches) * torch.distributed.get_world_size()), device=device)
    return (total, micro_batches), metrics


def heldout_micro_batches(rows: int, micro_batch_size: int, world: int, rank: int) -> list[np.ndarray]:
    """This rank's share of `rows` held-out pairs, in micro-batches: every rank gets the same number of full
    micro-batches (ZeRO-3's gathers need every rank in every forward), the last ones filled with row indices past
    `rows` that `heldout_pass` drops."""
    per_rank = -(-rows // (micro_batch_size * world))
    starts = [(k * world + rank) * micro_batch_size for k in range(per_rank)]
    return [np.arange(start, start + micro_batch_size) for start in starts]


@torch.no_grad()
def heldout_pass(engine, batches: Iterable[tuple[np.ndarray, PairBatch]], rows: int, device) -> torch.Tensor:
    """(2 views, rows, 2) fp64, the same on every rank: each held-out pair's chosen and rejected sums under the model
    as it is, with its images (`seen`) and blanked (`blind`), in eval mode. `batches` pairs each rank's micro-batch
    rows (indices past `rows` are filler, dropped) with its collated batch."""
    out = torch.zeros((len(VIEWS), rows + 1, 2), dtype=torch.float64, device=device)  # the last row takes filler
    engine.eval()
    try:
        for indices, (batch, pairs) in batches:
            batch = on_device(batch, device)
            at = torch.as_tensor(np.minimum(indices, rows), device=device)
            for view, inputs in enumerate((batch, blanked(batch))):
                logps, _ = answer_logps(engine, inputs)
                out[view].index_add_(0, at, pair_columns(logps, pairs).double())
    finally:
        engine.train()
    torch.distributed.all_reduce(out)
    return out[:, :rows]


def heldout_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict:
    """Per view: the implicit reward's accuracy (chosen's reward beta * (log pi - log ref) above rejected's), its
    mean margin and rewards, and how often the reference itself, and the policy, gives the chosen answer the higher
    likelihood (the reference's figure is the starting model's: at step 0 every reward is 0, a tie, not a win)."""
    report = {"pairs": int(policy.shape[1])}
    for view, name in enumerate(VIEWS):
        rewards = beta * (policy[view] - reference[view])
        margin = rewards[:, 0] - rewards[:, 1]
        report[name] = {
            "reward_accuracy": _share(margin > 0), "reward_margin": _mean(margin),
            "reward_chosen": _mean(rewards[:, 0]), "reward_rejected": _mean(rewards[:, 1]),
            "policy_prefers_chosen": _share(policy[view][:, 0] > policy[view][:, 1]),
            "reference_prefers_chosen": _share(reference[view][:, 0] > reference[view][:, 1]),
        }
    return report


def reference_bytes(train: torch.Tensor, heldout: torch.Tensor | None) -> bytes:
    """The checkpoint's copy of the reference sums (`REFERENCE_FILE`)."""
    buffer = io.BytesIO()
    arrays = {"train": train.cpu().numpy()}
    if heldout is not None:
        arrays["heldout"] = heldout.cpu().numpy()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_reference(data: bytes, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    with np.load(io.BytesIO(data)) as arrays:
        heldout = torch.from_numpy(arrays["heldout"]).to(device) if "heldout" in arrays else None
        return torch.from_numpy(arrays["train"]).to(device), heldout


def _share(flags: torch.Tensor) -> float:
    return round(float(flags.double().mean()), 4) if flags.numel() else 0.0


def _mean(values: torch.Tensor) -> float:
    return round(float(values.mean()), 4) if values.numel() else 0.0


# --- what the training loop calls ---------------------------------------------------------------------------------


class Collation(NamedTuple):
    """How a rank turns prefetched pairs into model inputs (`engine.model_inputs`)."""
    image_token_id: int
    pixels: object  # image_layouts' pixel inputs of the model's family
    pad_id: int


def pair_batches(prefetcher, collation: Collation) -> Iterator[PairBatch]:
    for micro, batch, _ in prefetcher:
        yield PairBatch(model_inputs(batch, *collation, flatten=False), len(np.concatenate(micro)))


def training_reference(engine, rows, micro_batches, collation: Collation, device) -> torch.Tensor:
    """(world, micro-batches, pairs, 2): the reference sums of every rank's micro-batches of the whole stage, in
    plan order (`micro_batches`: this rank's, from step 0)."""
    with BatchPrefetcher(rows, micro_batches, False, collation.pad_id, collation.pixels, pairs=True) as prefetcher:
        mine = reference_pass(engine, pair_batches(prefetcher, collation), device)
    return gather_reference(mine)


def heldout_logps(engine, rows, micro_batch_size: int, collation: Collation, device) -> torch.Tensor:
    """`heldout_pass` over every pair of `rows` (the held-out dataset's prepared rows), shared among the ranks."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    shares = heldout_micro_batches(rows.num_rows, micro_batch_size, world, rank)
    readable = [[np.array([min(i, rows.num_rows - 1)]) for i in share] for share in shares]  # filler: a real row
    with BatchPrefetcher(rows, iter(readable), False, collation.pad_id, collation.pixels, pairs=True) as prefetcher:
        return heldout_pass(engine, zip(shares, pair_batches(prefetcher, collation)), rows.num_rows, device)
