"""DeepSpeed ZeRO-3 facts the model code needs: whether a tensor is partitioned, its full shape, and its full
value for a while. Outside ZeRO-3 every helper is a no-op, so the same code runs unpartitioned."""
from __future__ import annotations

import contextlib


def is_partitioned(tensor) -> bool:
    return hasattr(tensor, "ds_id")


def full_shape(tensor) -> tuple:
    """A parameter's full shape, also when ZeRO-3 left only an empty local shard."""
    return tuple(getattr(tensor, "ds_shape", None) or tensor.shape)


@contextlib.contextmanager
def gathered(tensors: list, modifier_rank: int | None = None):
    """The full values of ZeRO-3-partitioned `tensors` on every rank for the duration. With `modifier_rank`, what
    that rank writes into them is partitioned back to every rank on exit; without, changes are discarded."""
    partitioned = [t for t in tensors if is_partitioned(t)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def zero3_paused():
    """transformers' ZeRO-3 hook off for the duration. A model shell built on the meta device, whose parts are
    replaced by loaded ones, must not be built partitioned and randomly initialised (transformers' `_from_config`
    does that under ZeRO-3, and fails on meta buffers). transformers exposes set/unset of its weak reference only, so
    the reference itself is kept and restored."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
