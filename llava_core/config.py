"""The workflow schema: typed sections, loaded from YAML with errors that name the exact key.

Every section is a dataclass; `load_workflow` rejects unknown keys and wrong types with their YAML path
(`instruct.lr: expected a number, got 'fast'`) before any Ray worker starts. `--set a.b=value` overrides merge in
before validation.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

TRAINABLE_PARTS = ("projector", "llm", "vision")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every LLaMA Linear
SAMPLING = ("random", "length_grouped", "modality_grouped")
TRACKERS = ("", "mlflow", "wandb")


class WorkflowError(ValueError):
    """A problem in a workflow file, reported before any work starts."""


@dataclass
class ScalingSettings:
    num_workers: int = 2  # training workers (one per GPU on a GPU cluster)
    use_gpu: bool = False
    cpus_per_worker: float = 1
    gpus_per_worker: float = 1  # only read when use_gpu is true
    peak_tflops_per_worker: Optional[float] = None  # for MFU; None: known GPUs (H100, A100, ...) or no MFU


@dataclass
class TinyModelSettings:
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 3
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    vocab_size: int = 600


@dataclass
class SyntheticSettings:
    """Generate the quickstart dataset and tiny base models under `root` when they are not there yet."""
    root: str = "data/quickstart"
    seed: int = 0
    align_rows: int = 2000
    instruct_rows: int = 3000
    text_only_rows: int = 40
    eval_questions: int = 200
    tiny_model: TinyModelSettings = field(default_factory=TinyModelSettings)


@dataclass
class ModelSettings:
    vision_tower: str = "openai/clip-vit-large-patch14-336"  # HF id or path (local or s3://)
    llm: str = "lmsys/vicuna-7b-v1.5"


@dataclass
class DatasetSettings:
    path: str = ""  # JSON array, JSONL or parquet of LLaVA rows
    image_folder: str = ""  # relative image paths are resolved against this
    template: str = "vicuna_v1"  # plain | vicuna_v1


@dataclass
class PrepareSettings:
    max_length: int = 2048  # tokens, image tokens included
    too_long: str = "reject"  # reject | truncate (text only, never through image tokens)
    image_aspect_ratio: str = "pad"  # pad | square
    max_image_pixels: int = 64_000_000
    max_reject_fraction: float = 0.01
    rows_per_shard: int = 2000
    num_actors: int = 2


@dataclass
class LoraSettings:
    """LoRA on the LLM's Linear layers only (never projector, vision tower or lm_head). LLaVA-1.5: r=128, alpha=256."""
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class TrainStageSettings:
    dataset: str = ""  # a key of `datasets`
    trainable: list = field(default_factory=lambda: ["projector"])  # any of projector, llm, vision
    epochs: int = 1
    global_batch_size: int = 128
    micro_batch_size: int = 16
    lr: float = 2e-5
    projector_lr: Optional[float] = None  # None: same as lr (LLaVA-1.5 LoRA: lr 2e-4, projector 2e-5)
    lora: Optional[LoraSettings] = None  # set (even `lora: {}`) to train LoRA adapters instead of the whole LLM
    init_projector: str = ""  # instruct only: an official LLaVA mm_projector.bin to start from instead of align
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO 2/3: optimizer state in CPU memory
    offload_params: bool = False  # ZeRO 3 only: parameters in CPU memory
    bf16: bool = True  # only on GPU; CPU training runs in fp32
    gradient_checkpointing: bool = False
    sampling: str = "random"  # random | length_grouped | modality_grouped (LLaVA-1.5 instruct)
    packing: bool = False  # several samples per row (no attention across them); micro_batch_size counts rows
    pack_length: int = 0  # tokens per packed row; 0: the longest sample
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the stage fails
    log_every: int = 10
    seed: int = 0
    tracking: str = ""  # "", "mlflow" (MLFLOW_TRACKING_URI) or "wandb" (WANDB_PROJECT); TensorBoard is always on


@dataclass
class EvaluateSettings:
    questions: str = ""  # LLaVA eval layout: jsonl of {question_id, image, text[, category]}
    answers: str = ""  # jsonl of {question_id, answer}
    image_folder: str = ""
    max_new_tokens: int = 8
    batch_size: int = 32


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = ""  # defaults to the workflow name
    num_replicas: int = 1
    max_ongoing_requests: int = 32
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    default_max_tokens: int = 64
    max_tokens_limit: int = 512
    max_images: int = 4
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000
    api_key: Optional[str] = None  # when set, requests need `Authorization: Bearer <key>`


@dataclass
class Workflow:
    name: str = "llava"
    storage: str = "runs"  # run directory root, local or s3://; the run lives in <storage>/<name>
    ray_address: Optional[str] = None  # None: a local in-process Ray; "auto" or ray://host:10001 for a cluster
    synthetic: Optional[SyntheticSettings] = None
    model: ModelSettings = field(default_factory=ModelSettings)
    datasets: dict = field(default_factory=dict)  # name -> DatasetSettings
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    prepare: PrepareSettings = field(default_factory=PrepareSettings)
    align: TrainStageSettings = field(default_factory=lambda: TrainStageSettings(dataset="align", lr=1e-3))
    instruct: TrainStageSettings = field(
        default_factory=lambda: TrainStageSettings(dataset="instruct", trainable=["projector", "llm"]))
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)

    @property
    def run_dir(self) -> str:
        from llava_core import storage

        return storage.join(storage.absolute(self.storage), self.name)


DICT_OF = {("Workflow", "datasets"): DatasetSettings}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _build(cls, data: Any, path: str):
    if not isinstance(data, dict):
        raise WorkflowError(f"{path or 'workflow'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(names))})"
            raise WorkflowError(f"{where}: unknown key{hint}")
        if (cls.__name__, key) in DICT_OF:
            if not isinstance(value, dict):
                raise WorkflowError(f"{where}: expected a mapping of name -> settings")
            kwargs[key] = {k: _build(DICT_OF[(cls.__name__, key)], v, f"{where}.{k}") for k, v in value.items()}
        else:
            kwargs[key] = _convert(hints[key], value, where)
    return cls(**kwargs)


def _convert(tp, value, where):
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            pass
    if tp in (int, str, bool, float) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise WorkflowError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is list and not isinstance(value, list):
        raise WorkflowError(f"{where}: expected a list, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise WorkflowError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise WorkflowError(f"--set {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return data


def load_workflow(path: str, overrides: list[str] = ()) -> Workflow:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise WorkflowError(f"workflow file not found: {path}") from None
    except yaml.YAMLError as error:
        raise WorkflowError(f"{path}: not valid YAML: {error}") from None
    workflow = _build(Workflow, apply_overrides(data, list(overrides)), "")
    validate(workflow)
    resolve_local_paths(workflow)
    return workflow


def resolve_local_paths(w: Workflow) -> None:
    """Make local paths absolute: Ray workers run in other working directories. Hub ids stay as they are."""
    import os

    from llava_core import storage

    def local(path: str) -> str:
        return path if not path or storage.is_remote(path) else os.path.abspath(path)

    for ds in w.datasets.values():
        ds.path, ds.image_folder = local(ds.path), local(ds.image_folder)
    e = w.evaluate
    e.questions, e.answers, e.image_folder = local(e.questions), local(e.answers), local(e.image_folder)
    for attr in ("vision_tower", "llm"):
        path = getattr(w.model, attr)
        if w.synthetic is not None or os.path.exists(path):  # the quickstart creates its models on first run
            setattr(w.model, attr, local(path))
    if w.synthetic is not None:
        w.synthetic.root = local(w.synthetic.root)


def validate(w: Workflow) -> None:
    from llava_core.data.templates import TEMPLATES

    for name, ds in w.datasets.items():
        if ds.template not in TEMPLATES:
            raise WorkflowError(f"datasets.{name}.template: {ds.template!r} is not one of {list(TEMPLATES)}")
        if not ds.path:
            raise WorkflowError(f"datasets.{name}.path: required")
    for stage_name in ("align", "instruct"):
        stage: TrainStageSettings = getattr(w, stage_name)
        if stage.dataset not in w.datasets:
            raise WorkflowError(f"{stage_name}.dataset: {stage.dataset!r} is not a key of datasets "
                                f"({', '.join(w.datasets) or 'none defined'})")
        bad = [p for p in stage.trainable if p not in TRAINABLE_PARTS]
        if bad or not stage.trainable:
            raise WorkflowError(f"{stage_name}.trainable: {bad or 'empty'}; choose from {list(TRAINABLE_PARTS)}")
        per_step = w.scaling.num_workers * stage.micro_batch_size
        if stage.global_batch_size % per_step:
            raise WorkflowError(
                f"{stage_name}.global_batch_size: {stage.global_batch_size} is not divisible by scaling.num_workers "
                f"x {stage_name}.micro_batch_size = {per_step}; gradient accumulation must be a whole number")
        validate_train_stage(stage_name, stage)
    if w.prepare.too_long not in ("reject", "truncate"):
        raise WorkflowError(f"prepare.too_long: {w.prepare.too_long!r} is not 'reject' or 'truncate'")
    if w.prepare.image_aspect_ratio not in ("pad", "square"):
        raise WorkflowError(f"prepare.image_aspect_ratio: {w.prepare.image_aspect_ratio!r} is not 'pad' or 'square'")


def validate_train_stage(name: str, stage: TrainStageSettings) -> None:
    if stage.zero_stage not in (0, 1, 2, 3):
        raise WorkflowError(f"{name}.zero_stage: {stage.zero_stage} is not a DeepSpeed ZeRO stage; use 0, 1, 2 or 3")
    if stage.offload_params and stage.zero_stage != 3:
        raise WorkflowError(f"{name}.offload_params: needs zero_stage 3 (ZeRO 1/2 keep parameters on the device)")
    if stage.offload_optimizer and stage.zero_stage not in (1, 2, 3):
        raise WorkflowError(f"{name}.offload_optimizer: needs zero_stage 1, 2 or 3")
    if stage.sampling not in SAMPLING:
        raise WorkflowError(f"{name}.sampling: {stage.sampling!r} is not one of {list(SAMPLING)}")
    if stage.tracking not in TRACKERS:
        raise WorkflowError(f"{name}.tracking: {stage.tracking!r} is not one of {list(TRACKERS)}")
    if stage.lora is not None:
        if "llm" not in stage.trainable:
            raise WorkflowError(f"{name}.lora: LoRA trains the LLM; add 'llm' to {name}.trainable or remove lora")
        bad = [m for m in stage.lora.target_modules if m not in LORA_TARGETS]
        if bad or not stage.lora.target_modules:
            raise WorkflowError(f"{name}.lora.target_modules: {bad or 'empty'}; choose from {list(LORA_TARGETS)}")
        if stage.lora.r < 1 or not 0 <= stage.lora.dropout < 1:
            raise WorkflowError(f"{name}.lora: r must be >= 1 and dropout in [0, 1)")
    if stage.init_projector and name != "instruct":
        raise WorkflowError(f"{name}.init_projector: only the instruct stage starts from an official projector")
    if stage.packing and stage.sampling == "modality_grouped":
        raise WorkflowError(f"{name}.packing: packs rows of any modality together; use sampling random or "
                            f"length_grouped with packing")


def settings_hash(*parts: Any) -> str:
    """A stable fingerprint of settings: a stage reruns when the hash of what produced it changes."""
    def plain(obj):
        return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
