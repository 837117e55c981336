"""The DeepSpeed engine of a training stage, the micro-batches it takes and one optimizer step on it. Used by the
Ray Train worker loop and, without Ray, by `benchmarks/gpu_step.py` and the engine tests.

The model loads in the training dtype (bf16 on GPU, fp32 on CPU). Under ZeRO-3 it loads partitioned: while
`zero3_loading` is active transformers builds every model inside `deepspeed.zero.Init`, each rank materialises only
its 1/world share of each parameter and only rank 0 reads checkpoint values, so no rank ever holds the whole model
(a 13B model in fp32 on every GPU was 52 GB before ZeRO-3 partitioned it).

Loss normalisation (`loss_normalization`): `token` divides the summed loss of every supervised token by the number of
supervised tokens in the whole optimizer step, counted over all ranks and micro-batches (HF Trainer's rule since
4.46): every token weighs the same, whether its micro-batch holds short answers or long descriptions. `sample` is
LLaVA-1.5's own: the mean of per-micro-batch token means, where a token in a short-answer batch under length or
modality grouping weighs ~10x one in a long-description batch.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from llava_core.data.templates import IGNORE_INDEX
from llava_core.model.lora import llava_of
from llava_core.schema import TrainStageSettings
from llava_core.train.freeze import apply_stage_training, numel, parameter_groups
from llava_core.train.loss import next_token_loss

# transformers keeps a weak reference to the active HfDeepSpeedConfig: this keeps it alive for the worker's life, so
# everything that asks `is_deepspeed_zero3_enabled()` (loading, resizing embeddings, peft) sees ZeRO-3.
_ZERO3_CONFIG: list = []

# Test mode: train in bf16 on CPU too, so that defects only bf16 shows (DeepSpeed's dtype checks, peft's adapter
# dtypes) fail a CPU test rather than a GPU run. Slower and less exact than fp32 on CPU: tests only.
BF16_ON_CPU_ENV = "LLAVA_RAY_BF16_ON_CPU"


def training_dtype(stage: TrainStageSettings, use_gpu: bool) -> torch.dtype:
    """bf16 on GPU when the stage asks for it; CPU kernels are fp32 (bf16 there is slower and less exact) unless the
    test mode `LLAVA_RAY_BF16_ON_CPU=1` asks for bf16."""
    bf16_here = use_gpu or os.environ.get(BF16_ON_CPU_ENV) == "1"
    return torch.bfloat16 if bf16_here and stage.bf16 else torch.float32


def grad_accum_steps(stage: TrainStageSettings, world_size: int) -> int:
    """Micro-batches per rank per optimizer step (the workflow checks that the division is exact)."""
    return stage.global_batch_size // (world_size * stage.micro_batch_size)


def deepspeed_config(stage: TrainStageSettings, world_size: int, use_gpu: bool, hidden_size: int = 0,
                     layer_params: int = 0) -> dict:
    """DeepSpeed's config for the stage; `hidden_size` and `layer_params` (the LLM's width and one decoder layer's
    parameters, once it is built) size ZeRO-3's prefetching and what stays unpartitioned."""
    zero = {"stage": stage.zero_stage}
    if stage.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if stage.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if stage.zero_stage == 3:
        # Save writes the weights itself, module by module (train/save.py): never gather a 16-bit copy of everything.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if hidden_size:  # keep only vectors (norms, biases) unpartitioned, as HF Trainer's "auto" does
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
        if layer_params:  # prefetch the next decoder layer whole while this one computes (HF's "auto", 0.9 x
            # hidden^2, is one matrix of a layer's seven: its gathers then wait on each other)
            zero["stage3_prefetch_bucket_size"] = layer_params
        if stage.zero_hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = stage.zero_hpz_partition_size
    bf16 = training_dtype(stage, use_gpu) == torch.bfloat16
    return {
        "train_batch_size": stage.global_batch_size,
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(stage, world_size),
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # Gradients accumulate over micro-batches and reduce over ranks in fp32 (DeepSpeed's default is the model's
        # dtype): bf16's 8-bit mantissa loses small gradients in sums over 2-64 terms. Megatron's choice too; it
        # doubles the gradient bytes reduced (7B: 27 GB instead of 13.5 a step, ~0.06 s on one node's NVLink).
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"} if bf16 else {}),
        "zero_allow_untested_optimizer": True,  # torch AdamW (fused on GPU): DeepSpeed's FusedAdam needs its own build
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def zero3_loading(ds_config: dict):
    """Models built inside load partitioned when the stage runs ZeRO-3 (transformers' own `HfDeepSpeedConfig`
    hook); a no-op otherwise. The config stays registered afterwards (see `_ZERO3_CONFIG`)."""
    if ds_config["zero_optimization"]["stage"] == 3 and not _ZERO3_CONFIG:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        without_cpu_inference_comm_op()
        deepspeed.init_distributed()  # zero.Init checks the batch sizes against DeepSpeed's view of the world size

        _ZERO3_CONFIG.append(HfDeepSpeedConfig(ds_config))
    hpz = ds_config["zero_optimization"].get("zero_hpz_partition_size", 1) > 1
    with hpz_group_reused() if hpz else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def hpz_group_reused():
    """Every `deepspeed.zero.Init` after the first reuses ZeRO++'s intra-node group instead of failing on it.
    DeepSpeed (0.19.8) creates the group in each Init and asserts when it exists ("ZeRO parameter intra parallel
    group is already initialized", deepspeedai/DeepSpeed#4901), and transformers opens one Init per model it loads:
    the tower, the LLM, then the projector's. The reuse is the fix proposed upstream (deepspeedai/DeepSpeed#8361):
    the same size makes the same groups; another size is refused."""
    from deepspeed.utils import groups

    create = groups._create_zero_param_parallel_group

    def create_once(group_size: int):
        existing = groups._get_zero_param_intra_parallel_group()
        if existing is None:
            return create(group_size)
        wanted = min(group_size, torch.distributed.get_world_size())
        if torch.distributed.get_world_size(existing) != wanted:
            raise RuntimeError(f"ZeRO++ intra-node groups of {torch.distributed.get_world_size(existing)} ranks "
                               f"exist; this stage asks for {wanted}")

    groups._create_zero_param_parallel_group = create_once
    try:
        yield
    finally:
        groups._create_zero_param_parallel_group = create


def without_cpu_inference_comm_op() -> None:
    """Before DeepSpeed's communication backend starts on CPU: its CPU accelerator would JIT-compile a shared-memory
    all-reduce (`deepspeed_shm_comm`), ~25 s of C++ build on every new install path and one more per torch
    extensions cache, while every rank waits, for a kernel only DeepSpeed inference's `inference_all_reduce` calls.
    Training's collectives go through torch.distributed (gloo). GPU accelerators have no such op: untouched."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed caches this dict: it sticks


def build_optimizer(groups: list[dict], stage: TrainStageSettings, use_gpu: bool):
    """torch AdamW, fused on GPU (one kernel for all parameters); with optimizer offload on a GPU, DeepSpeed's CPU
    Adam (torch's is far slower on CPU state)."""
    groups = [{k: v for k, v in g.items() if k != "part"} for g in groups]
    if stage.offload_optimizer and use_gpu:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=stage.lr, weight_decay=stage.weight_decay)
    return torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay, fused=use_gpu)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """As HF Trainer: ceil(ratio x total)."""
    return math.ceil(total_steps * warmup_ratio)


def enable_recompute(llava, every: int) -> None:
    """Activation checkpointing (non-reentrant) on each layer of the vision tower and on every `every`-th decoder
    layer of the LLM, the first included; the LLM's other layers keep their activations. transformers'
    `every_n_layers` would count layers over the whole model, tower first: the LLM's layers are chosen by their own
    index instead, as the plan's memory counts them."""
    llava.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for index, layer in enumerate(llava.model.language_model.layers):
        layer.gradient_checkpointing = index % every == 0  # the flag transformers' layers read on each call


def build_engine(model, stage: TrainStageSettings, world_size: int, total_steps: int, use_gpu: bool,
                 device: torch.device):
    """(engine, scheduler, parameter groups): the model frozen per stage, checkpointed if asked, on `device` unless
    ZeRO-3 already placed its partitions, in train mode, with AdamW and the transformers cosine schedule."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    without_cpu_inference_comm_op()
    model = apply_stage_training(model, stage.trainable, stage.lora)
    if stage.gradient_checkpointing:
        enable_recompute(llava_of(model), stage.recompute_every)
    if stage.zero_stage != 3:
        model = model.to(device)  # before the optimizer: fused AdamW wants its parameters on the GPU
    groups = parameter_groups(model, stage.lr, stage.projector_lr, stage.weight_decay, stage.vision_lr)
    optimizer = build_optimizer(groups, stage, use_gpu)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(total_steps, stage.warmup_ratio),
                                                total_steps)
    llava = llava_of(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(stage, world_size, use_gpu, llava.config.text_config.hidden_size,
                                decoder_layer_params(llava)))
    # from_pretrained returns eval mode: without this, gradient checkpointing (transformers checkpoints only when
    # `self.training`) and LoRA dropout silently do nothing.
    engine.train()
    return engine, scheduler, groups


def decoder_layer_params(llava) -> int:
    """One LLM decoder layer's parameters, counted whole under ZeRO-3 (LoRA's adapters included)."""
    return sum(numel(p) for p in llava.model.language_model.layers[0].parameters())


def supervised_tokens(batch: dict) -> int:
    """Tokens the loss counts: labels shifted by one (the first position predicts nothing), as transformers does."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def optimizer_step(engine, batches: list[dict], normalization: str, device: torch.device) -> tuple:
    """Forward and backward over this rank's micro-batches of one optimizer step, then DeepSpeed's step.

    Returns (this rank's loss numerator, the step's global denominator) as device tensors; the caller sums the
    numerators over ranks: token normalisation gives (summed token losses, supervised tokens of all ranks), sample
    normalisation (summed micro-batch means, micro-batches of all ranks). DeepSpeed divides each micro-batch's loss
    by the accumulation steps and averages gradients over ranks; passing `num_items_in_batch` = global tokens /
    (ranks x accumulation) undoes both, so the gradient is that of (sum of token losses) / (global supervised
    tokens)."""
    micro_batches = len(batches) * torch.distributed.get_world_size()
    if normalization == "token":
        tokens = torch.tensor(float(sum(supervised_tokens(b) for b in batches)), device=device)
        torch.distributed.all_reduce(tokens)
        per_micro = tokens.clamp(min=1) / micro_batches  # the global count, as each micro-batch's share
    numerator = torch.zeros((), device=device)
    for batch in batches:
        batch = on_device(batch, device)
        if normalization == "token":
            loss = next_token_loss(engine, batch, per_micro)
            numerator += loss.detach().float() * per_micro
        else:
            loss = next_token_loss(engine, batch)
            numerator += loss.detach().float()
        engine.backward(loss)
        engine.step()
    denominator = tokens if normalization == "token" else torch.tensor(float(micro_batches), device=device)
    return numerator, denominator


def with_blank_image_row(batch: dict, image_token_id: int, blank: tuple[dict, int], pad_id: int) -> dict:
    """A text-only micro-batch gets one extra row: a blank image's tokens, nothing supervised (`blank`: that image's
    model inputs and token count, from `image_layouts`). The vision tower and projector then run in the same order
    as on every other rank: ZeRO-3 gathers parameters module by module and ZeRO-2 reduces the same gradients, so a
    rank that skipped them would hang the others (the official code's ZeRO hang). Rows are independent and the row
    has no labels, so the loss is unchanged."""
    image_inputs, image_tokens = blank
    ids = batch["input_ids"]
    width = max(ids.shape[1], image_tokens)

    def add_row(tensor, row_value, fill):
        grown = torch.full((tensor.shape[0] + 1, width), fill, dtype=tensor.dtype)
        grown[:-1, : tensor.shape[1]] = tensor
        grown[-1, :image_tokens] = row_value
        return grown

    out = dict(batch)
    out["input_ids"] = add_row(ids, image_token_id, pad_id)
    out["labels"] = add_row(batch["labels"], IGNORE_INDEX, IGNORE_INDEX)
    if "attention_mask" in batch:
        out["attention_mask"] = add_row(batch["attention_mask"], 1, 0)
    if "position_ids" in batch:  # packed rows: the blank row is its own sequence
        out["position_ids"] = add_row(batch["position_ids"], torch.arange(image_tokens), 0)
        out["position_ids"][:-1, ids.shape[1]:] = torch.arange(width - ids.shape[1])
    out.update(image_inputs)  # OneVision's batch_num_images [1]: the model reads it only to patch the blank image
    return out


def model_inputs(batch: dict, image_token_id: int, pixels, pad_id: int, flatten: bool) -> dict:
    """A collated micro-batch as the model takes it: a blank image row when it has no image and no video
    (`pixels.blank()`; a video runs the same tower, projector and image_newline), packed rows as one row for flash
    attention's variable-length kernel."""
    if batch["pixel_values"] is None and batch.get("pixel_values_videos") is None:
        batch = with_blank_image_row(batch, image_token_id, pixels.blank(), pad_id)
    return flatten_packed(batch) if flatten else batch


def flatten_packed(batch: dict) -> dict:
    """Packed rows as one row, for flash attention's variable-length kernel (transformers takes that path only for a
    batch of one row whose position ids restart). Each row's padding tail is already its own unsupervised segment,
    so the segments stay separate; images keep their order.

    The segments' boundaries go with it as transformers' `FlashAttentionKwargs` (`cu_seq_lens_*`, `max_length_*`),
    found by transformers' own function once per micro-batch on the host: without them transformers finds them from
    `position_ids` on the GPU in every attention call (a `nonzero` and host syncs per layer, again in each
    recomputation)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    flat = dict(batch)
    for key in ("input_ids", "labels", "position_ids"):
        flat[key] = batch[key].reshape(1, -1)
    (bounds, _), (longest, _) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])  # on the host, here
    longest = int(longest)  # an int: flash attention's kernel takes it on the host
    flat.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
    return flat


def on_device(batch: dict, device: torch.device) -> dict:
    """A micro-batch's tensors on the training device; its other values (`max_length_*`) as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
