"""The chunked loss's memory, measured at a real size (4096 supervised positions, Qwen2's 152K vocabulary) in fresh
processes: ~40 s on 2 cores, so end-to-end. Its values against transformers' own loss: tests/unit/test_train_loss.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

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
