"""The training loss (llava_core/train/loss.py) is transformers' own causal LM loss, with logits only at supervised
positions and the fp32 cross-entropy one chunk at a time: same loss, same gradients (its memory, measured at real
size: tests/end_to_end/test_train_loss.py)."""
from __future__ import annotations

import pytest
import torch

from llava_core.train.loss import next_token_loss, summed_cross_entropy, supervised_positions


def image_batch(config, rows: int = 3, seed: int = 0) -> dict:
    """Rows of different lengths, right-padded: a prompt with the image's tokens, then a supervised answer."""
    g = torch.Generator().manual_seed(seed)
    size, image = config.vision_config.image_size, config.image_seq_length
    answers = [5, 17, 2][:rows]
    width = 4 + image + max(answers)
    ids = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), -100, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, answer in enumerate(answers):
        row = torch.cat([torch.randint(5, 100, (3,), generator=g), torch.full((image,), config.image_token_index),
                         torch.randint(5, 100, (1 + answer,), generator=g)])
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
        labels[i, len(row) - answer:len(row)] = row[-answer:]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.randn(rows, 3, size, size, generator=g)}


def loss_and_gradients(model, compute) -> tuple[float, dict]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("num_items", [None, 11.0])  # sample normalisation (a mean), token normalisation (a sum / n)
def test_same_loss_and_gradients_as_transformers_own_loss(tiny_dataset, num_items):
    from llava_core.model.build import assemble

    torch.manual_seed(0)
    model, _ = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    model.train()
    batch = image_batch(model.config)
    items = None if num_items is None else torch.tensor(num_items)
    extra = {} if items is None else {"num_items_in_batch": items}
    theirs = loss_and_gradients(model, lambda: model(**batch, use_cache=False, **extra).loss)
    ours = loss_and_gradients(model, lambda: next_token_loss(model, batch, items))
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5) and ours[0] > 1.0
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) > 10
    for name, grad in theirs[1].items():
        assert torch.allclose(ours[1][name], grad, rtol=1e-4, atol=1e-6 + 1e-4 * float(grad.abs().max())), name


def test_small_chunks_and_a_batch_with_nothing_supervised():
    logits = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (10,))
    whole = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    chunked = summed_cross_entropy(logits, targets, chunk_bytes=3 * 4 * 7)  # 3 rows a chunk: 4 chunks, one short
    assert float(chunked) == pytest.approx(float(whole), rel=1e-6)
    (grad_whole,) = torch.autograd.grad(whole, logits)
    (grad_chunked,) = torch.autograd.grad(chunked, logits)
    assert torch.allclose(grad_whole, grad_chunked.to(grad_whole.dtype), atol=1e-6)
    # nothing supervised: zero, and backward still runs (every rank must join ZeRO's gradient reduction)
    empty = torch.zeros(0, 7, requires_grad=True)
    loss = summed_cross_entropy(empty, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and empty.grad.shape == (0, 7)


def test_supervised_positions_predict_the_next_token():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, -100]])
    assert supervised_positions(labels).tolist() == [[False, True, True, False, False],
                                                     [True, False, False, False, False]]
