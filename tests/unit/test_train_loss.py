"""The training loss (llava_core/train/loss.py) is transformers' own causal LM loss, with logits only at supervised
positions and the fp32 cross-entropy one chunk at a time: same loss, same gradients, bounded memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

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


PEAK_SCRIPT = """
import json, resource, sys, torch
from llava_core.train.loss import summed_cross_entropy
rows, vocab, chunked = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
logits = torch.randn(rows, vocab, dtype=torch.bfloat16).requires_grad_()
targets = torch.randint(0, vocab, (rows,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if chunked:
    loss = summed_cross_entropy(logits, targets)
else:  # transformers' way: the whole fp32 upcast, then the cross-entropy
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
loss.backward()
print(json.dumps({"above_gib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20}))
"""


def peak_above_logits(chunked: bool, rows: int, vocab: int) -> float:
    # freed blocks go back to the system at once (glibc would keep them in its heap and RSS would not fall)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(rows), str(vocab), "1" if chunked else "0"],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["above_gib"]


def test_peak_memory_is_bounded_by_the_chunk_not_the_sequence():
    """4096 supervised positions under a 152K vocabulary (Qwen2's): bf16 logits 1.16 GiB. The whole fp32 upcast,
    its softmax and gradient take ~2.3 GiB each; the chunked loss holds one 512 MiB chunk of each at a time, plus
    the bf16 gradient of the logits (1.16 GiB, the caller's to keep either way)."""
    rows, vocab = 4096, 152_064
    logits_gib = rows * vocab * 2 / 2**30
    chunked, whole = peak_above_logits(True, rows, vocab), peak_above_logits(False, rows, vocab)
    print(f"above the bf16 logits: chunked {chunked:.2f} GiB, whole fp32 {whole:.2f} GiB")
    assert chunked < logits_gib + 2.0  # the logits' gradient, and at most ~3 chunk-sized fp32 tensors
    assert whole > logits_gib + 4.0  # the control: the whole upcast costs far more
