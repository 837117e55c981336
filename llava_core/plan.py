"""`llava-ray validate --plan`: what a workflow will do and roughly what it will cost, before anything runs.

Per training stage: workers and their resources, steps, tokens, FLOPs, GPU-hours and memory per GPU. Nothing is
downloaded: model sizes come from a local `config.json` or from the architectures of the models the official recipe
uses (below); dataset sizes from the prepare stage's manifest when it exists, else from the official files' known row
counts, else from counting a local file. Every assumption is printed beside the numbers it produced.

FLOPs are model FLOPs from `llava_core.flops`, the same count the training stage's MFU uses: the time estimate is
those FLOPs divided by `--mfu` of the GPU's peak, so an MFU a run reports is the one to plan the next run with.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from llava_core import storage
from llava_core.config import WorkflowError, dataset_sources
from llava_core.flops import GPUS, PartSizes, training_flops
from llava_core.schema import parse_sampling

# Architectures of the recipe's models, so a plan needs no download: the config.json keys the plan reads.
KNOWN_LLMS = {
    "lmsys/vicuna-7b-v1.5": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
                             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "lmsys/vicuna-13b-v1.5": {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 13824,
                              "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000},
    "meta-llama/Meta-Llama-3-8B-Instruct": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                                            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "mistralai/Mistral-7B-Instruct-v0.2": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                                           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
    "Qwen/Qwen2-7B-Instruct": {"hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944,
                               "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                               "attention_bias": True, "tokenizer_tokens": 151646},
}
# The LLaMA-family tokenizers here have neither `<image>` nor `<pad>`; building LLaVA adds both and grows the
# embeddings (llava_core.model.processors.load_tokenizer). Qwen2's 151,646 tokens already fit its
# 152,064 rows, `<image>` and `<video>` included.
KNOWN_LLM_ADDED_TOKENS = 2
KNOWN_TOWERS = {"openai/clip-vit-large-patch14-336": {"model_type": "clip_vision_model", "hidden_size": 1024,
                                                      "num_hidden_layers": 24, "intermediate_size": 4096,
                                                      "image_size": 336, "patch_size": 14},
                "google/siglip-so400m-patch14-384": {"model_type": "siglip_vision_model", "hidden_size": 1152,
                                                     "num_hidden_layers": 27, "intermediate_size": 4304,
                                                     "image_size": 384, "patch_size": 14}}
# A COCO-sized 640 x 480 image, as the family's processor lays it out (its `_get_num_multimodal_tokens`, at the real
# towers' tiles): (image tokens, tower passes). What the plan assumes per image until prepare has counted the data.
TYPICAL_IMAGE = {"llava": None, "llava_next": (2340, 5), "llava_onevision": (2929, 5)}
KNOWN_DATASETS = {"blip_laion_cc_sbu_558k": 558_128, "llava_v1_5_mix665k": 665_298}
# Average tokens per row, image tokens included, when nothing better is known: LLaVA-Pretrain captions are short;
# the 665k mix averages a few hundred text tokens and ~94% of its rows carry an image.
DEFAULT_TEXT_TOKENS = {"plain": 20, "vicuna_v1": 250, "chat_template": 250}
# Of those, the supervised ones (answers and their end-of-turn tokens): a caption and its newline; about half of a
# conversation (the answers outweigh the questions). An assumption until prepare has counted them.
DEFAULT_SUPERVISED_TOKENS = {"plain": 15, "vicuna_v1": 125, "chat_template": 125}
IMAGE_ROW_FRACTION = {"plain": 1.0, "vicuna_v1": 0.94, "chat_template": 0.94}


@dataclass
class ModelSize:
    """What the plan knows of the model: the FLOP model's part sizes (LoRA is the stage's, added per stage), every
    parameter per part (for memory), the (in, out) features of each Linear of one LLM layer (for LoRA's size)."""
    parts: PartSizes
    params: dict[str, int]
    linears: dict[str, tuple[int, int]]
    layers: int
    hidden: int
    source: str
    tokens_per_image: int  # an image's <image> tokens (AnyRes: a typical 640 x 480 image's)
    views_per_image: int  # tower passes an image takes (AnyRes: its tiles and base view)


def local_config(path: str) -> dict | None:
    config_path = os.path.join(path, "config.json")
    return json.load(open(config_path)) if not storage.is_remote(path) and os.path.exists(config_path) else None


def llm_config(llm: str) -> tuple[dict, int, str]:
    """(config, vocabulary size of the built LLaVA, where the config came from)."""
    from llava_core.model.build import embedding_rows

    config = local_config(llm)
    if config:
        from llava_core.model.processors import load_tokenizer  # the tokens building LLaVA adds

        tokens = len(load_tokenizer(llm))
        return config, embedding_rows(config["vocab_size"], tokens), "config.json"
    if llm in KNOWN_LLMS:
        config = KNOWN_LLMS[llm]
        tokens = config.get("tokenizer_tokens", config["vocab_size"] + KNOWN_LLM_ADDED_TOKENS)
        return config, embedding_rows(config["vocab_size"], tokens), "known architecture"
    raise KeyError(f"model.llm {llm!r}: not a local HF directory and not one of the known architectures "
                   f"({', '.join(KNOWN_LLMS)}); plan with a local copy of its config.json")


def llama_linears(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each Linear in one LLaMA-style decoder layer, by module name (LoRA's target names);
    grouped-query attention's k/v projections are narrower."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}


def llm_params(config: dict, vocab: int) -> tuple[int, int]:
    """(parameters the FLOP model counts, all parameters) of a LLaMA-style LLM: per layer its Linears (with biases
    where the config has them) and 2 norms, the final norm, the lm_head; all parameters add the input embedding
    table unless it is tied to the lm_head."""
    linears, hidden = llama_linears(config), config["hidden_size"]
    biases = sum(out for name, (_, out) in linears.items() if config.get(
        "mlp_bias" if name in ("gate_proj", "up_proj", "down_proj") else "attention_bias", False))
    layer = sum(i * o for i, o in linears.values()) + biases + 2 * hidden
    counted = config["num_hidden_layers"] * layer + hidden + lm_head_params(config, vocab)
    return counted, counted + (0 if config.get("tie_word_embeddings", False) else lm_head_params(config, vocab))


def lm_head_params(config: dict, vocab: int) -> int:
    """The lm_head (and the input embedding table: the same shape)."""
    return vocab * config["hidden_size"]


def tower_config(tower: str) -> dict:
    config = local_config(tower)
    if config:
        return config.get("vision_config", config)  # a full CLIP repo nests its vision tower's config
    if tower in KNOWN_TOWERS:
        return KNOWN_TOWERS[tower]
    raise KeyError(f"model.vision_tower {tower!r}: not a local HF directory and not a known tower "
                   f"({', '.join(KNOWN_TOWERS)})")


def vision_params(config: dict, layers: int) -> int:
    """Every parameter of transformers' CLIPVisionModel (patch embedding without bias, CLS and position embeddings,
    pre-norm) or SiglipVisionModel without its pooling head (patch embedding with bias, position embeddings, no CLS,
    no pre-norm), running `layers` layers of 4 attention + 2 MLP Linears with biases and 2 norms, then a norm."""
    hidden, inner, patch = config["hidden_size"], config["intermediate_size"], config["patch_size"]
    clip = config.get("model_type", "clip_vision_model").startswith("clip")
    positions = (config["image_size"] // patch) ** 2 + int(clip)
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden * inner + inner + hidden + 4 * hidden
    embeddings = config.get("num_channels", 3) * patch * patch * hidden + positions * hidden
    embeddings += hidden + 2 * hidden if clip else hidden  # CLS + pre-norm | the patch embedding's bias
    return embeddings + layers * layer + 2 * hidden


def model_size(workflow) -> ModelSize:
    from llava_core.model.families import family

    llm, vocab, source = llm_config(workflow.model.llm)
    tower = tower_config(workflow.model.vision_tower)
    hidden, patches = llm["hidden_size"], (tower["image_size"] // tower["patch_size"]) ** 2
    projector = tower["hidden_size"] * hidden + hidden + hidden * hidden + hidden  # Linear, GELU, Linear
    llm_counted, llm_all = llm_params(llm, vocab)
    layers = tower["num_hidden_layers"] - int(family(workflow.model.family).drops_last_tower_layer)
    vision = vision_params(tower, layers)
    # One projected feature per patch and view (the "default" strategy drops CLIP's CLS: 576 for CLIP-L/336).
    clip = tower.get("model_type", "clip_vision_model").startswith("clip")
    parts = PartSizes(vision=vision, projector=projector, llm=llm_counted - lm_head_params(llm, vocab),
                      lm_head=lm_head_params(llm, vocab), lora=0,
                      vision_positions=patches + int(clip), image_tokens=patches,
                      llm_layers=llm["num_hidden_layers"], llm_attention_width=llama_linears(llm)["q_proj"][1],
                      vision_layers=layers, vision_width=tower["hidden_size"])
    typical = TYPICAL_IMAGE[workflow.model.family] or (patches, 1)
    return ModelSize(parts, {"llm": llm_all, "vision": vision, "projector": projector}, llama_linears(llm),
                     llm["num_hidden_layers"], hidden, source, *typical)


def prepared_datasets(workflow) -> dict:
    """The prepare stage's manifest entries per dataset, when it ran and its storage is reachable from here. Read
    once per plan: an unreachable bucket costs seconds of retries per attempt."""
    try:
        manifest = storage.read_json(storage.join(workflow.run_dir, "prepare", "manifest.json"))
    except (OSError, ValueError):  # not prepared yet, or a bucket this machine cannot reach
        return {}
    return manifest["datasets"]


def dataset_rows(workflow, name: str, prepared: dict) -> tuple[int | None, str]:
    entry = prepared.get(name)
    if entry:
        return entry["rows_written"], "prepare manifest"
    total, how = 0, set()
    for source in dataset_sources(workflow.datasets[name]):
        rows, source_how = source_rows(source.path)
        if rows is None:
            return None, source_how
        total += sampled_rows(rows, source.sampling)
        how.add(source_how)
    return total, " + ".join(sorted(how))


def source_rows(path: str) -> tuple[int | None, str]:
    for known, rows in KNOWN_DATASETS.items():
        if known in os.path.basename(path):
            return rows, "known size of the official file"
    if not storage.is_remote(path) and os.path.exists(path) and os.path.getsize(path) < 200_000_000:
        from llava_core.data.sources import SourceError, iter_rows  # the reader prepare streams with

        try:
            return sum(1 for _ in iter_rows(path)), "counted"
        except SourceError as error:  # prepare would fail on it too: say so in the plan, not as a traceback
            raise WorkflowError(str(error)) from None
    return None, "unknown (run the prepare stage, then plan again)"


def sampled_rows(rows: int, sampling: str) -> int:
    """Rows a source contributes under its sampling strategy (`all`, `first:N`, `random:N`, `25%`, ...)."""
    parsed = parse_sampling(sampling)
    if parsed is None:
        return rows
    _, number, percent = parsed
    return min(rows, math.ceil(number * rows / 100) if percent else number)


def lora_params(stage, size: ModelSize) -> int:
    """LoRA's parameters: r x (in + out) (peft's lora_A and lora_B) per adapted Linear, in every LLM layer."""
    return size.layers * stage.lora.r * sum(sum(size.linears[name]) for name in stage.lora.target_modules)


def trained_params(stage, size: ModelSize) -> dict[str, int]:
    """Parameters that get gradients and optimizer state, per part; with LoRA the LLM's are its adapters'."""
    trained = {part: size.params[part] for part in stage.trainable}
    if "llm" in trained and stage.lora is not None:
        trained["llm"] = lora_params(stage, size)
    return trained


@dataclass(frozen=True)
class RowAverages:
    """Per sequence of a row: a preference row (a pair) is two sequences, each with the pair's images."""
    tokens: float  # image tokens included
    views: float  # tower passes
    supervised: float  # labelled tokens
    source: str
    sequences: int = 1
    longest: int | None = None  # the longest row's tokens (a pair's: both sequences), when prepare measured it


def row_averages(workflow, dataset: str, size: ModelSize, prepared: dict) -> RowAverages:
    """Tokens, tower passes and supervised tokens per row: measured by the prepare stage when it ran (passes: one
    image's typical views per image row), else the recipe's averages."""
    entry = prepared.get(dataset)
    sequences = 2 if workflow.datasets[dataset].kind == "preference" else 1
    if entry and entry["rows_written"]:
        rows = entry["rows_written"]
        image_rows = rows - entry.get("text_only_rows", 0)
        return RowAverages(entry["tokens"] / rows / sequences, size.views_per_image * image_rows / rows,
                           entry["supervised_tokens"] / rows / sequences, "prepare manifest", sequences,
                           entry.get("longest_row"))
    template = workflow.datasets[dataset].template
    fraction = IMAGE_ROW_FRACTION.get(template, 1.0)
    return RowAverages(fraction * size.tokens_per_image + DEFAULT_TEXT_TOKENS.get(template, 250),
                       fraction * size.views_per_image, DEFAULT_SUPERVISED_TOKENS.get(template, 125),
                       "recipe averages", sequences)


def stage_flops_per_row(stage, size: ModelSize, row: RowAverages, trainable: list[str] | None = None) -> float:
    """Model FLOPs of one average row in this stage (`trainable` []: a forward pass alone). Attention counts the
    average sequence's length squared: sequences of unequal lengths cost more (by their lengths' variance)."""
    lora = stage.lora is not None
    parts = dataclasses.replace(size.parts, lora=lora_params(stage, size) if lora else 0)
    flops = training_flops(parts, stage.trainable if trainable is None else trainable, lora)
    return row.sequences * flops(row.tokens, row.views, row.tokens ** 2, row.supervised)


def micro_batch_tokens(stage, row: RowAverages) -> tuple[float, str]:
    """(the tokens of the micro-batch the stage's memory must fit, where that figure comes from): every row as long
    as the longest prepared row, or a full packed row, as grouping by length puts the longest rows together; before
    prepare has measured the rows, the average row's (the plan says so)."""
    if stage.packing and stage.pack_length:
        return stage.micro_batch_size * stage.pack_length, "packed rows"
    if row.longest:
        return stage.micro_batch_size * row.longest, "the longest prepared row"
    return stage.micro_batch_size * row.tokens * row.sequences, "average rows: prepare measures the longest"


def memory_per_gpu_gb(stage, size: ModelSize, workers: int, tokens: float) -> dict[str, float]:
    """bf16 weights (2 B), fp32 gradients (4 B: they accumulate and reduce in fp32, `train/engine.py`) and fp32 Adam
    (master + 2 moments, 12 B) per parameter, divided over the workers as the ZeRO stage shards them; offloaded state
    lives in CPU memory instead. Activations, for a micro-batch of `tokens`: ~34 B x hidden per token in each decoder
    layer that keeps its activations (Korthikanti et al., without the attention scores that SDPA and flash attention
    never store); in each layer that recomputes (`gradient_checkpointing`, `recompute_every`), its input (2 B x hidden
    per token), plus one such layer's working set during its backward."""
    zero = stage.zero_stage
    total = sum(size.params.values())
    trained = sum(trained_params(stage, size).values())
    weights = 2 * total / (workers if zero >= 3 else 1)
    if zero >= 3 and stage.zero_hpz_partition_size > 1:  # ZeRO++'s second, node-local partition
        weights += 2 * total / stage.zero_hpz_partition_size
    grads = (4 if stage.bf16 else 2) * trained / (workers if zero >= 2 else 1)
    optimizer = 12 * trained / (workers if zero >= 1 else 1)
    if stage.offload_optimizer:
        optimizer = 0.0
    if stage.offload_params and zero >= 3:
        weights = 0.0
    recomputed = -(-size.layers // stage.recompute_every) if stage.gradient_checkpointing else 0
    kept = size.layers - recomputed
    working_set = 34 * size.hidden if recomputed else 0  # one recomputed layer's activations during its backward
    activations = tokens * (2 * size.hidden * recomputed + 34 * size.hidden * kept + working_set)
    gb = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations}
    gb = {k: round(v / 1e9, 3) for k, v in gb.items()}
    gb["total"] = round(sum(gb.values()), 3)
    return gb


def checkpoint_gb(stage, size: ModelSize, workers: int) -> dict[str, float]:
    """A mid-stage checkpoint (`train/checkpoints.py`): fp32 Adam state (master + 2 moments, 12 B) and the weights in
    the training dtype (2 B) of every trained parameter; frozen ones are not saved. Under ZeRO-3 each rank writes
    1/workers of both; under ZeRO 0-2 of the optimizer state, and rank 0 the weights."""
    trained = sum(trained_params(stage, size).values())
    optimizer, weights = 12 * trained, 2 * trained
    sharded = optimizer + weights if stage.zero_stage >= 3 else optimizer
    per_rank = sharded / workers
    # scratch on an 8-GPU node holding rank 0: its ranks' shards and rank 0's unsharded weights, twice (the next
    # checkpoint may start while the last one still uploads)
    node = 2 * (min(8, workers) * per_rank + (optimizer + weights - sharded))
    return {"total": round((optimizer + weights) / 1e9, 1), "per_rank": round(per_rank / 1e9, 2),
            "node_of_8_gpus": round(node / 1e9)}


def training_plan(workflow, stage_name: str, size: ModelSize, prepared: dict, gpu: str, mfu: float) -> dict:
    stage, scaling = getattr(workflow, stage_name), workflow.scaling
    rows, rows_source = dataset_rows(workflow, stage.dataset, prepared)
    row = row_averages(workflow, stage.dataset, size, prepared)
    tokens = row.tokens
    workers = scaling.num_workers
    micro_tokens, micro_source = micro_batch_tokens(stage, row)
    plan = {
        "stage": stage_name, "dataset": stage.dataset, "rows": rows, "rows_from": rows_source,
        "workers": workers, "resources_per_worker": worker_resources(scaling),
        "trainable": {p: n for p, n in trained_params(stage, size).items()},
        "zero_stage": stage.zero_stage,
        "grad_accum": stage.global_batch_size // (workers * stage.micro_batch_size),
        "tokens_per_row": round(tokens * row.sequences), "tokens_from": row.source,
        "memory_per_gpu_gb": memory_per_gpu_gb(stage, size, workers, micro_tokens),
        "memory_micro_batch": {"tokens": round(micro_tokens), "from": micro_source},
        "checkpoint_gb": checkpoint_gb(stage, size, workers), "checkpoint_every": stage.checkpoint_every,
    }
    if rows is None:
        return plan
    steps = rows // stage.global_batch_size * stage.epochs
    steps = min(steps, stage.max_steps) if stage.max_steps else steps
    flops = stage_flops_per_row(stage, size, row) * steps * stage.global_batch_size
    if stage_name == "preference":  # the reference pass: the starting model's forward over every pair, per epoch
        plan["reference_flops"] = stage_flops_per_row(stage, size, row, []) * steps * stage.global_batch_size
        flops += plan["reference_flops"]
    peak = GPUS[gpu].tflops * 1e12
    gpus = workers if scaling.use_gpu else 0
    plan.update(steps=steps, tokens=round(tokens * row.sequences * steps * stage.global_batch_size), flops=flops)
    if gpus:
        hours = flops / (gpus * peak * mfu) / 3600
        plan.update(gpu_hours=round(hours * gpus, 1), wall_hours=round(hours, 2),
                    step_s=round(hours * 3600 / max(steps, 1), 2))
    return plan


def memory_advice(stage_plan: dict, gpu: str) -> str:
    """Say before the run, not as an OOM an hour in, when a stage will not fit the GPU, and what to change."""
    capacity = GPUS[gpu].memory_gb
    need = stage_plan["memory_per_gpu_gb"]["total"]
    if "GPU" not in stage_plan["resources_per_worker"] or need <= 0.9 * capacity:
        return ""
    return (f"needs ~{need:.0f} GB of the {gpu}'s {capacity} GB: raise zero_stage (3 shards the weights), set "
            "offload_optimizer, turn on gradient_checkpointing (recompute_every 1: every layer), or lower "
            "micro_batch_size")


def worker_resources(scaling) -> dict:
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return resources


def build_plan(workflow, gpu: str = "a100-80gb", mfu: float = 0.3) -> dict:
    if gpu not in GPUS:
        raise KeyError(f"--gpu {gpu!r}: choose one of {', '.join(GPUS)}")
    size, prepared = model_size(workflow), prepared_datasets(workflow)
    return {
        "model": {"llm_params": size.params["llm"], "vision_params": size.params["vision"],
                  "projector_params": size.params["projector"], "image_tokens": size.tokens_per_image,
                  "family": workflow.model.family,
                  "from": size.source},
        "assumptions": {"gpu": gpu, "peak_flops": GPUS[gpu].tflops * 1e12, "mfu": mfu},
        "stages": [{"stage": "prepare", "engine": "Ray Data", "actors": workflow.prepare.num_actors,
                    "datasets": sorted(workflow.datasets)},
                   *[training_plan(workflow, name, size, prepared, gpu, mfu) for name in workflow.training_stages()],
                   {"stage": "export", "engine": "transformers"},
                   {"stage": "evaluate", "engine": "Ray Data"},
                   {"stage": "serve", "engine": "Ray Serve", "replicas": workflow.serve.num_replicas}],
    }


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def format_plan(plan: dict) -> str:
    m, a = plan["model"], plan["assumptions"]
    lines = [f"model: LLM {human(m['llm_params'])}, vision {human(m['vision_params'])}, projector "
             f"{human(m['projector_params'])} parameters, {m['image_tokens']} tokens per image "
             f"({m['family']}{', a 640 x 480 image' if m['family'] != 'llava' else ''}; {m['from']})",
             f"assuming {a['gpu']} at {a['peak_flops'] / 1e12:.0f} TFLOP/s peak and {a['mfu']:.0%} model-FLOPs "
             f"utilisation (--gpu, --mfu)"]
    for s in plan["stages"]:
        if "workers" not in s:
            lines.append(f"  {s['stage']:<9} {s['engine']}" + (f", {s['actors']} actors" if "actors" in s else "")
                         + (f", {s['replicas']} replica(s)" if "replicas" in s else ""))
            continue
        trained = ", ".join(f"{p} {human(n)}" for p, n in s["trainable"].items())
        lines.append(f"  {s['stage']:<9} Ray Train + DeepSpeed ZeRO-{s['zero_stage']}: {s['workers']} workers x "
                     f"{s['resources_per_worker']}, accumulation {s['grad_accum']}; trains {trained}")
        if s.get("steps") is None:
            lines.append(f"            rows {s['rows_from']}")
        else:
            lines.append(f"            {s['rows']:,} rows ({s['rows_from']}) -> {s['steps']:,} steps, "
                         f"{human(s['tokens'])} tokens at ~{s['tokens_per_row']} per row ({s['tokens_from']}), "
                         f"{s['flops']:.2e} FLOPs"
                         + (f" ({s['reference_flops']:.2e} of them the reference pass)" if "reference_flops" in s
                            else ""))
        if "gpu_hours" in s:
            lines.append(f"            ~{s['gpu_hours']} GPU-hours, ~{s['wall_hours']} h wall, ~{s['step_s']} s a step "
                         f"at {a['mfu']:.0%} MFU")
        ckpt = s["checkpoint_gb"]
        lines.append(f"            checkpoint ~{ckpt['total']:.3g} GB every {s['checkpoint_every']} steps, "
                     f"{ckpt['per_rank']:.1f} GB a rank: scaling.local_dir needs ~{ckpt['node_of_8_gpus']} GB "
                     "on an 8-GPU node (two checkpoints while one uploads)" if s["checkpoint_every"] else
                     f"            no mid-stage checkpoints (checkpoint_every 0; one would be ~{ckpt['total']:.0f} GB)")
        mem = s["memory_per_gpu_gb"]
        device = "GPU" if "GPU" in s["resources_per_worker"] else "worker"
        micro = s["memory_micro_batch"]
        lines.append(f"            memory per {device} ~{mem['total']:.1f} GB (weights {mem['weights']:.1f}, gradients "
                     f"{mem['gradients']:.1f}, optimizer {mem['optimizer']:.1f}, activations {mem['activations']:.1f} "
                     f"for micro-batches of {micro['tokens']:,} tokens: {micro['from']})")
        advice = memory_advice(s, plan["assumptions"]["gpu"])
        if advice:
            lines.append(f"            warning: {advice}")
    return "\n".join(lines)
