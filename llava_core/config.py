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


class WorkflowError(ValueError):
    """A problem in a workflow file, reported before any work starts."""


@dataclass
class ScalingSettings:
    num_workers: int = 2  # training workers (one per GPU on a GPU cluster)
    use_gpu: bool = False
    cpus_per_worker: float = 1
    gpus_per_worker: float = 1  # only read when use_gpu is true


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
class SourceSettings:
    """One annotation file of a dataset mixture, as in LLaVA-NeXT's data YAML."""
    path: str = ""  # JSON array, JSONL or parquet (image bytes inline or paths), local or s3://
    image_folder: str = ""  # relative image paths are resolved against this
    sampling: str = "all"  # all | first:N | last:N | random:N | N% (random) | first:N% | last:N% | random:N%
    seed: int = 0  # for random sampling


@dataclass
class DatasetSettings:
    path: str = ""  # JSON array, JSONL or parquet of LLaVA rows (or give `sources` for a mixture)
    image_folder: str = ""  # relative image paths are resolved against this
    template: str = "vicuna_v1"  # plain | vicuna_v1 | chat_template (the LLM tokenizer's own Jinja template)
    sampling: str = "all"  # as SourceSettings.sampling, for `path`
    seed: int = 0
    sources: list = field(default_factory=list)  # a mixture: list of SourceSettings mappings, instead of `path`


def dataset_sources(ds: DatasetSettings) -> list[SourceSettings]:
    """The sources of a dataset: its mixture, or its single `path`."""
    if ds.sources:
        return list(ds.sources)
    return [SourceSettings(path=ds.path, image_folder=ds.image_folder, sampling=ds.sampling, seed=ds.seed)]


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
class TrainStageSettings:
    dataset: str = ""  # a key of `datasets`
    trainable: list = field(default_factory=lambda: ["projector"])  # any of projector, llm, vision
    epochs: int = 1
    global_batch_size: int = 128
    micro_batch_size: int = 16
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    zero_stage: int = 2
    bf16: bool = True  # only on GPU; CPU training runs in fp32
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the stage fails
    log_every: int = 10
    seed: int = 0


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
        for source in ds.sources:
            source.path, source.image_folder = local(source.path), local(source.image_folder)
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
        validate_sources(ds, f"datasets.{name}")
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
        if stage.zero_stage not in (0, 1, 2):
            raise WorkflowError(f"{stage_name}.zero_stage: {stage.zero_stage} is not supported yet; use 0, 1 or 2 "
                                f"(ZeRO-3 needs a gathered export, not built yet)")
    if w.prepare.too_long not in ("reject", "truncate"):
        raise WorkflowError(f"prepare.too_long: {w.prepare.too_long!r} is not 'reject' or 'truncate'")
    if w.prepare.image_aspect_ratio not in ("pad", "square"):
        raise WorkflowError(f"prepare.image_aspect_ratio: {w.prepare.image_aspect_ratio!r} is not 'pad' or 'square'")
    if not 0.0 <= w.prepare.max_reject_fraction <= 1.0:
        raise WorkflowError(f"prepare.max_reject_fraction: {w.prepare.max_reject_fraction} is not between 0 and 1")
    for key in ("max_length", "rows_per_shard", "num_actors"):
        if getattr(w.prepare, key) < 1:
            raise WorkflowError(f"prepare.{key}: {getattr(w.prepare, key)} must be at least 1")


def validate_sources(ds: DatasetSettings, where: str) -> None:
    """`path` or `sources` (not both); each source a mapping with a path and a sampling strategy that parses."""
    from llava_core.data.sources import parse_sampling

    if ds.path and ds.sources:
        raise WorkflowError(f"{where}: give either path (one source) or sources (a mixture), not both")
    if not ds.path and not ds.sources:
        raise WorkflowError(f"{where}.path: required (or sources: a list of {{path, image_folder, sampling}})")
    if not isinstance(ds.sources, list):
        raise WorkflowError(f"{where}.sources: expected a list of mappings")
    ds.sources = [s if isinstance(s, SourceSettings) else _build(SourceSettings, s, f"{where}.sources[{i}]")
                  for i, s in enumerate(ds.sources)]
    for i, source in enumerate(dataset_sources(ds)):
        at = f"{where}.sources[{i}]" if ds.sources else where
        if not source.path:
            raise WorkflowError(f"{at}.path: required")
        try:
            parse_sampling(source.sampling)
        except ValueError as error:
            raise WorkflowError(f"{at}.sampling: {error}") from None


def settings_hash(*parts: Any) -> str:
    """A stable fingerprint of settings: a stage reruns when the hash of what produced it changes."""
    def plain(obj):
        return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
