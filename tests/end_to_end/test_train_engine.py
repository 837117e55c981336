"""The training engine as the worker loop drives it (build_model, build_engine, optimizer_step, save_hf_model), run by
real DeepSpeed in 1 or 2 CPU processes over gloo, without Ray Train (the quicker checks:
tests/integration/test_train_engine.py):

- token-normalised loss: the same samples give the same gradient however they are split into micro-batches and ranks
  (and sample normalisation does not, so the check can fail);
- under ZeRO-3 no rank holds the whole model, at load, in a step or while the weights are saved, and the saved
  checkpoint loads back exactly.
"""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.ports import free_port
from tests.train_engine_helpers import batch_of, build, samples, stage_settings


def gradients_after_one_step(engine, micro_batches: list[dict], normalization: str) -> dict:
    """Every trained parameter's gradient as DeepSpeed hands it to the optimizer (after accumulation and the
    all-reduce over ranks), captured at the optimizer's step."""
    from llava_core.train.engine import optimizer_step

    captured = {}
    optimizer = engine.optimizer
    original = optimizer.step

    def capture(*args, **kwargs):
        for name, param in engine.module.named_parameters():
            if param.grad is not None:
                captured[name] = param.grad.detach().clone()
        return original(*args, **kwargs)

    optimizer.step = capture
    optimizer_step(engine, micro_batches, normalization, torch.device("cpu"))
    optimizer.step = original
    return captured


def split(rows: list[dict], rank: int, world: int, micro: int) -> list[dict]:
    """This rank's micro-batches of one optimizer step over `rows`, as the batch plan deals them (round robin)."""
    chunks = [rows[i:i + micro] for i in range(0, len(rows), micro)]
    return [batch_of(chunk) for chunk in chunks[rank::world]]


def rank_gradients(rank: int, world: int, port: int, models: dict, micro: int, normalization: str, out: str):
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    engine, _ = build(models, stage_settings(micro_batch_size=micro, global_batch_size=8), world)
    rows = samples(engine)
    grads = gradients_after_one_step(engine, split(rows, rank, world, micro), normalization)
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def gradients(models: dict, world: int, micro: int, normalization: str, tmp_path) -> dict:
    out = str(tmp_path / f"grads-{world}-{micro}-{normalization}.pt")
    mp.start_processes(rank_gradients, args=(world, free_port(), models, micro, normalization, out), nprocs=world,
                       start_method="spawn")
    return torch.load(out)


def assert_same(a: dict, b: dict, rtol=1e-4) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=rtol, atol=1e-7 + rtol * float(a[name].abs().max())), name


def assert_differ(a: dict, b: dict) -> None:
    assert any(not torch.allclose(a[n], b[n], rtol=1e-2, atol=1e-2 * float(a[n].abs().max())) for n in a)


def test_token_normalisation_gives_one_gradient_for_any_split_into_micro_batches_and_ranks(tiny_dataset, tmp_path):
    """8 samples, half with 30 supervised tokens and half with 2, as one step of 8 = 1 rank x 8, 1 rank x 4 x 2
    accumulation steps, 2 ranks x 2 x 2."""
    token = {split_: gradients(tiny_dataset, *split_, "token", tmp_path) for split_ in ((1, 8), (1, 4), (2, 2))}
    assert_same(token[(1, 8)], token[(1, 4)])
    assert_same(token[(1, 8)], token[(2, 2)])
    # LLaVA-1.5's per-micro-batch mean weighs the short answers' tokens more once they sit in their own micro-batch.
    sample = {split_: gradients(tiny_dataset, *split_, "sample", tmp_path) for split_ in ((1, 8), (2, 2))}
    assert_differ(sample[(1, 8)], sample[(2, 2)])


def anonymous_rss() -> int:
    """This process's resident anonymous memory (what it allocated; mapped checkpoint files are the page cache's)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["RssAnon"].split()[0]) * 1024


class PeakSampler:
    """The highest anonymous RSS seen, sampled every 5 ms in a thread (the kernel tracks only the total's peak)."""

    def __init__(self):
        self.peak, self._stop = anonymous_rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, anonymous_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, anonymous_rss())


def zero3_rank(rank: int, world: int, port: int, models: dict, out_dir: str):
    """Peak anonymous memory above the process's own (imports, gloo), per phase: load, one step, save."""
    from llava_core.train.engine import optimizer_step
    from llava_core.train.save import save_hf_model

    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import deepspeed  # noqa: F401  (imported code is not the model: measured from after the imports)

    import llava_core.model.build  # noqa: F401
    import llava_core.train.loop  # noqa: F401

    stage = stage_settings(trainable=["projector"], zero_stage=3, micro_batch_size=2, global_batch_size=4)
    baseline, peaks, sampler = anonymous_rss(), {}, PeakSampler()
    engine, processor = build(models, stage, world)
    peaks["load"], sampler = sampler.stop() - baseline, PeakSampler()
    optimizer_step(engine, [batch_of(samples(engine, 2, seed=rank))], "token", torch.device("cpu"))
    peaks["step"], sampler = sampler.stop() - baseline, PeakSampler()
    save_hf_model(engine.module, processor, os.path.join(out_dir, "model"), torch.float32, writer=rank == 0)
    peaks["save"] = sampler.stop() - baseline
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(peaks, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def wide_models(tiny_dataset, tmp_path_factory):
    """The tiny tower with a 336M-parameter Vicuna stand-in (1.34 GB in fp32, the CPU training dtype): big enough
    that a whole copy stands out against a worker's own memory."""
    from llava_core.quickstart import standins

    root = tmp_path_factory.mktemp("wide")
    corpus = [f"the shape {i} is red blue green" for i in range(100)]
    standins.save_vicuna(str(root / "llm"), corpus, standins.TinyModelConfig(llm_hidden=1024, llm_layers=32,
                                                                              llm_heads=8))
    return {"vision": tiny_dataset["vision"], "llm": str(root / "llm")}


def test_zero3_ranks_never_hold_the_whole_model_and_the_saved_weights_load_back(wide_models, tmp_path,
                                                                                 monkeypatch):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    # glibc raises its mmap threshold up to 32 MB after freeing a big block, then keeps freed tensors of this
    # model's size (4-8 MB) in the heap: RSS would count memory already freed. A 7B model's tensors (64-180 MB)
    # are always mmapped and returned; a fixed threshold gives the test that behaviour.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    mp.start_processes(zero3_rank, args=(2, free_port(), wide_models, str(tmp_path)), nprocs=2, start_method="spawn")
    saved = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "model"))
    full = sum(p.numel() * p.element_size() for p in saved.parameters())
    assert full > 1.3e9
    for rank in (0, 1):
        peaks = json.load(open(tmp_path / f"rank{rank}.json"))
        print(f"rank {rank}, GiB above its own baseline: " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in peaks.items())
              + f"; whole model {full / 2**30:.2f}")
        # Loading and saving: its half of every parameter, the (transformers-resized, unpartitioned) embeddings and
        # one module gathered at a time. Without ZeRO-3 loading, each rank held the whole model (1.0) at load;
        # the old save gathered and cloned all of it on rank 0 (2.0).
        assert peaks["load"] < 0.6 * full and peaks["save"] < 0.6 * full
        # A step adds what DeepSpeed keeps gathered between forward and backward (stage3_max_live_parameters, 1e9
        # as in LLaVA's zero3.json: all of this model, 15% of a 7B one) and activations.
        assert peaks["step"] < full
    # The LLM did not train: its weights come back exactly, under their plain LLaVA names.
    original = AutoModelForCausalLM.from_pretrained(wide_models["llm"], dtype=torch.float32)
    assert torch.equal(saved.model.language_model.layers[31].mlp.down_proj.weight,
                       original.model.layers[31].mlp.down_proj.weight)
    assert torch.equal(saved.lm_head.weight[:original.lm_head.weight.shape[0]], original.lm_head.weight)
