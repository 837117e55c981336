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
TRAINING_STAGES = ("align", "knowledge", "instruct")  # stage 1, OneVision's optional stage 1.5, stage 2
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every LLaMA Linear
SAMPLING = ("random", "length_grouped", "modality_grouped")
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
LOSS_NORMALIZATIONS = ("token", "sample")
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
    tower_pretraining_steps: int = 1000  # stands in for CLIP's pretraining; 0: a random tower


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


MODEL_FAMILIES = ("llava", "llava_next", "llava_onevision")  # llava_core/model/families.py says what each one is


@dataclass
class ModelSettings:
    family: str = "llava"  # llava (LLaVA-1.5) | llava_next (AnyRes, CLIP) | llava_onevision (Higher AnyRes, SigLIP)
    vision_tower: str = "openai/clip-vit-large-patch14-336"  # HF id or path (local or s3://)
    llm: str = "lmsys/vicuna-7b-v1.5"
    mirror: str = ""  # storage prefix with copies of hub repos as <mirror>/<org>/<name>; "" = fetch once per run


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
    # "": the family's own (llava: pad, llava_next: anyres, llava_onevision: anyres_max_9). llava: pad | square;
    # llava_next / llava_onevision: anyres | anyres_max_<tiles> (OneVision) | pad (one tile: the tower's base size)
    image_aspect_ratio: str = ""
    max_image_pixels: int = 64_000_000
    max_image_side: int = 8192  # longest side in pixels, checked from the header before decoding
    max_image_aspect_ratio: float = 20.0  # longest side / shortest side; `pad` makes a square of the longest side
    allow_paths_outside_image_folder: bool = False  # true: a row's `..`, absolute path or s3:// URI is read as is
    # Video rows (llava_onevision): every video becomes exactly this many frames (a batch's videos must have equal
    # counts; OneVision uses 32 = 6,273 tokens at SigLIP-384), spread over the whole clip (video_fps 0) or taken
    # every 1/video_fps seconds and then resampled to video_frames. Frames are checked against the image limits.
    video_frames: int = 32
    video_fps: float = 0.0
    max_video_bytes: int = 500_000_000  # a larger video file is rejected from its size, before it is read
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
    max_steps: int = 0  # stop after this many optimizer steps (at most the epochs' steps); 0: run the epochs
    global_batch_size: int = 128
    micro_batch_size: int = 16
    lr: float = 2e-5
    projector_lr: Optional[float] = None  # None: same as lr (LLaVA-1.5 LoRA: lr 2e-4, projector 2e-5)
    vision_lr: Optional[float] = None  # None: same as lr, when `vision` trains (OneVision: 2e-6 beside lr 1e-5)
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
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 (GPU, flash-attn installed) | eager
    loss_normalization: str = "token"  # token: every supervised token weighs the same | sample: LLaVA-1.5's
    sampling: str = "random"  # random | length_grouped | modality_grouped (LLaVA-1.5 instruct)
    packing: bool = False  # several samples per row (no attention across them); micro_batch_size counts rows
    pack_length: int = 0  # tokens per packed row; 0: the longest sample
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the stage fails
    log_every: int = 10
    metrics_sync_every: int = 50  # steps between background copies of metrics to the stage dir; 0 = only at the end
    seed: int = 0
    tracking: str = ""  # "", "mlflow" (MLFLOW_TRACKING_URI) or "wandb" (WANDB_PROJECT); TensorBoard is always on


EVAL_LAYOUTS = ("llava", "vqa", "pope", "mme", "choice")
MAIN_EVAL_SET = "main"  # the name of the set given by evaluate.questions / answers / image_folder


@dataclass
class EvalSetSettings:
    """One evaluation set; `llava_core.eval.layouts` reads each layout."""
    layout: str = "llava"  # llava | vqa | pope | mme | choice
    questions: str = ""  # jsonl (all layouts), VQAv2 questions JSON (vqa), MMBench TSV (choice); or a folder: POPE's
    # split files coco_pope_<split>.json (pope), MME's release folder (mme)
    answers: str = ""  # required for llava; optional elsewhere when the questions carry their answers; pope: may be
    # the folder of POPE's split files, labels then paired by position within each split (as LLaVA's eval_pope.py)
    image_folder: str = ""
    image_template: str = ""  # vqa: image name from row fields, e.g. COCO_val2014_{image_id:012d}.jpg
    primary: bool = False  # its accuracy / blind_accuracy become the top-level evaluate.accuracy / blind_accuracy
    circular: bool = False  # choice: correct only if correct under every rotation of the options (MMBench)
    prompt_suffix: Optional[str] = None  # None: the layout's LLaVA-1.5 instruction; "" for none
    limit: int = 0  # evaluate only the first N questions; 0 = all


@dataclass
class EvalEndpointSettings:
    """Evaluate a live OpenAI-compatible endpoint instead of the exported model."""
    url: str = ""  # base URL, e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str = ""
    api_key_env: Optional[str] = None  # the environment variable that holds the endpoint's key, if it has one
    api_key_file: Optional[str] = None  # or a file that holds it (a mounted Kubernetes secret)
    concurrency: int = 8  # requests in flight; the server batches them
    timeout_s: float = 300.0


@dataclass
class EvaluateSettings:
    # A LLaVA-layout set named "main", written inline (the quickstart's held-out questions); primary unless a set
    # in `sets` says `primary: true`.
    questions: str = ""  # LLaVA eval layout: jsonl of {question_id, image, text[, category]}
    answers: str = ""  # jsonl of {question_id, answer}
    image_folder: str = ""
    sets: dict = field(default_factory=dict)  # name -> EvalSetSettings
    max_new_tokens: int = 8
    batch_size: int = 32
    num_actors: int = 2  # in-process inference: Ray Data actors, each holding one copy of the model
    blind_baseline: bool = True  # also answer every question with a blank image
    report_examples: int = 6  # examples per set shown in evaluate/report.html
    endpoint: Optional[EvalEndpointSettings] = None  # set: ask this endpoint instead of the export

    def all_sets(self) -> dict:
        """Every set to evaluate, by name, the inline one first."""
        inline = {MAIN_EVAL_SET: EvalSetSettings(layout="llava", questions=self.questions, answers=self.answers,
                                                 image_folder=self.image_folder)}
        return {**(inline if self.questions else {}), **self.sets}

    def primary_set(self) -> Optional[str]:
        sets = self.all_sets()
        marked = [name for name, s in sets.items() if s.primary]
        if marked:
            return marked[0]
        if MAIN_EVAL_SET in sets:
            return MAIN_EVAL_SET
        return next(iter(sets)) if len(sets) == 1 else None


@dataclass
class AutoscalingSettings:
    """Ray Serve autoscaling of the serve deployment; when set, `serve.num_replicas` is not used."""
    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: Optional[int] = None
    target_ongoing_requests: float = 8  # per replica; above it Serve adds replicas
    upscale_delay_s: float = 30
    downscale_delay_s: float = 600


@dataclass
class VllmSettings:
    """For `serve.engine: vllm`: serve the export with vLLM through `ray.serve.llm` (GPU clusters)."""
    engine_kwargs: dict = field(default_factory=dict)  # passed to vLLM as they are: max_model_len, dtype, ...
    accelerator_type: Optional[str] = None  # e.g. A10G, L4, H100; None = any GPU


SERVE_ENGINES = ("transformers", "vllm")
OVERLOAD_STATUSES = (429, 503)


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = ""  # defaults to the workflow name
    engine: str = "transformers"  # transformers (this package's engine, CPU or GPU) | vllm (ray.serve.llm, GPU)
    num_replicas: int = 1
    autoscaling: Optional[AutoscalingSettings] = None
    cpus_per_replica: float = 1
    gpus_per_replica: Optional[float] = None  # None: 1 when the cluster has a GPU, else 0; fractions share a GPU
    max_ongoing_requests: int = 32  # per replica; more wait in Serve's queue
    health_check_period_s: float = 5  # how soon Serve notices a dead or failed replica and starts a new one
    max_queued_requests: int = 64  # per deployment handle; -1 = no limit; above it requests get `overload_status`
    overload_status: int = 429  # 429 or 503, with a Retry-After header
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    default_max_tokens: int = 64
    max_tokens_limit: int = 512
    max_body_bytes: int = 100_000_000  # larger request bodies get 413 before they are parsed
    body_read_timeout_s: float = 30.0  # a body not received in full by then gets 408 (a slow sender holds a slot)
    max_images: int = 4
    max_image_tokens: int = 32_768  # the images' <image> tokens per request, from their sizes (OneVision: <= ~8.8K each)
    max_prompt_chars: int = 100_000  # text over all messages, counted before tokenizing (~25K tokens of English)
    max_image_bytes: int = 20_000_000
    # video_url parts (llava_onevision): at most max_videos a request, each at most max_video_bytes, sampled to
    # video_frames frames (as prepare.video_frames: 32 is what OneVision trains with); their tokens count against
    # max_image_tokens. http(s) video URLs follow image_url_hosts and allow_private_image_hosts.
    max_videos: int = 1
    max_video_bytes: int = 100_000_000
    video_frames: int = 32
    max_image_pixels: int = 40_000_000
    max_image_side: int = 8192  # checked from the image header, before decoding or padding to a square
    max_image_aspect_ratio: float = 20.0
    image_url_hosts: list = field(default_factory=list)  # hosts http(s) image URLs may point at; empty = none
    allow_private_image_hosts: bool = False  # allow hosts that resolve to private/loopback/link-local addresses
    image_fetch_timeout_s: float = 10.0
    # Requests need `Authorization: Bearer <key>` when a key is named: the variable (or file) each replica reads it
    # from. Never the key itself: settings are copied into Serve configs, RayService objects and the dashboard.
    api_key_env: Optional[str] = None
    api_key_file: Optional[str] = None
    ready_timeout_s: Optional[float] = None  # how long deploy waits for /ready; None: 120 s + 60 s per GB of weights
    vllm: VllmSettings = field(default_factory=VllmSettings)


def serve_settings_from_dict(data: dict, where: str = "serve") -> ServeSettings:
    """Serve settings from a mapping (a workflow's `serve:` section, a Serve config's args), checked like a workflow."""
    settings = _build(ServeSettings, data, where)
    validate_serve(settings, where)
    return settings


def validate_serve(s: ServeSettings, where: str = "serve") -> None:
    if s.engine not in SERVE_ENGINES:
        raise WorkflowError(f"{where}.engine: {s.engine!r} is not one of {list(SERVE_ENGINES)}")
    if s.overload_status not in OVERLOAD_STATUSES:
        raise WorkflowError(f"{where}.overload_status: {s.overload_status} is not 429 or 503")
    positive = ("num_replicas", "max_ongoing_requests", "max_batch_size", "default_max_tokens", "max_tokens_limit",
                "max_body_bytes", "body_read_timeout_s", "max_images", "max_image_tokens", "max_prompt_chars",
                "max_image_bytes", "max_videos", "max_video_bytes", "video_frames",
                "max_image_pixels", "max_image_side", "max_image_aspect_ratio", "image_fetch_timeout_s",
                "health_check_period_s")
    for key in positive:
        if getattr(s, key) <= 0:
            raise WorkflowError(f"{where}.{key}: must be greater than 0, got {getattr(s, key)}")
    if s.max_image_aspect_ratio < 1:
        raise WorkflowError(f"{where}.max_image_aspect_ratio: longest side / shortest side, at least 1, got "
                            f"{s.max_image_aspect_ratio}")
    if s.ready_timeout_s is not None and s.ready_timeout_s <= 0:
        raise WorkflowError(f"{where}.ready_timeout_s: must be greater than 0 (or null: from the model's size), "
                            f"got {s.ready_timeout_s}")
    if s.max_queued_requests == 0 or s.max_queued_requests < -1:
        raise WorkflowError(f"{where}.max_queued_requests: a positive number, or -1 for no limit")
    if s.cpus_per_replica < 0 or (s.gpus_per_replica is not None and s.gpus_per_replica < 0):
        raise WorkflowError(f"{where}: cpus_per_replica and gpus_per_replica cannot be negative")
    if not all(isinstance(h, str) and h and "/" not in h for h in s.image_url_hosts):
        raise WorkflowError(f"{where}.image_url_hosts: a list of host names such as images.example.com")
    a = s.autoscaling
    if a is not None and not 0 <= a.min_replicas <= a.max_replicas:
        raise WorkflowError(f"{where}.autoscaling: needs 0 <= min_replicas <= max_replicas, got "
                            f"{a.min_replicas} and {a.max_replicas}")


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
    # LLaVA's defaults per stage; a workflow's `align:` / `instruct:` section overrides only the keys it sets.
    align: TrainStageSettings = field(default_factory=lambda: TrainStageSettings(dataset="align", lr=1e-3))
    # LLaVA-OneVision's stage 1.5 ("high-quality knowledge"): the full model on curated data between align and
    # instruct; absent (null) by default, as in LLaVA-1.5 and LLaVA-NeXT.
    knowledge: Optional[TrainStageSettings] = None
    instruct: TrainStageSettings = field(
        default_factory=lambda: TrainStageSettings(dataset="instruct", trainable=["projector", "llm"]))
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    # Sibling runs that change a few settings, compared with this one per eval category in summary.json:
    # name -> {dotted.key: value}, e.g. {pad: {prepare.image_aspect_ratio: pad}} (llava_core/ablations.py).
    ablations: dict = field(default_factory=dict)

    def training_stages(self) -> list[str]:
        """The training stages this workflow runs, in order."""
        return [name for name in TRAINING_STAGES if getattr(self, name) is not None]

    @property
    def run_dir(self) -> str:
        from llava_core import storage

        return storage.join(storage.absolute(self.storage), self.name)


DICT_OF = {("Workflow", "datasets"): DatasetSettings, ("EvaluateSettings", "sets"): EvalSetSettings}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


SECRET_IN_WORKFLOW = ("a key written in the workflow would be copied into Serve configs, the RayService object and "
                      "the dashboard; put it in an environment variable (or a file, such as a mounted Kubernetes "
                      "secret) and name that with api_key_env (or api_key_file)")
REMOVED_KEYS = {("ServeSettings", "api_key"): SECRET_IN_WORKFLOW, ("EvalEndpointSettings", "api_key"): SECRET_IN_WORKFLOW}


def _build(cls, data: Any, path: str, base: Any = None):
    """`cls` from a mapping; keys it does not set keep their value in `base` (default: the class defaults)."""
    if not isinstance(data, dict):
        raise WorkflowError(f"{path or 'workflow'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if (cls.__name__, key) in REMOVED_KEYS:
            raise WorkflowError(f"{where}: {REMOVED_KEYS[cls.__name__, key]}")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(names))})"
            raise WorkflowError(f"{where}: unknown key{hint}")
        section_default = _section_default(fields[key], value)
        if section_default is not None:
            kwargs[key] = _build(type(section_default), value, where, base=section_default)
        elif (cls.__name__, key) in DICT_OF:
            if not isinstance(value, dict):
                raise WorkflowError(f"{where}: expected a mapping of name -> settings")
            kwargs[key] = {k: _build(DICT_OF[(cls.__name__, key)], v, f"{where}.{k}") for k, v in value.items()}
        else:
            kwargs[key] = _convert(hints[key], value, where)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _section_default(f: dataclasses.Field, value: Any):
    """A nested section's own default (a partial `instruct:` still trains projector + LLM), or None."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return None
    default = f.default_factory()
    return default if dataclasses.is_dataclass(default) else None


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
    for s in e.sets.values():
        s.questions, s.answers, s.image_folder = local(s.questions), local(s.answers), local(s.image_folder)
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
    for stage_name in w.training_stages():
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
        if stage.attn_implementation == "flash_attention_2" and not w.scaling.use_gpu:
            raise WorkflowError(f"{stage_name}.attn_implementation: flash_attention_2 runs on GPUs only "
                                f"(scaling.use_gpu is false); use sdpa")
    if w.prepare.too_long not in ("reject", "truncate"):
        raise WorkflowError(f"prepare.too_long: {w.prepare.too_long!r} is not 'reject' or 'truncate'")
    validate_model(w)
    if not 0.0 <= w.prepare.max_reject_fraction <= 1.0:
        raise WorkflowError(f"prepare.max_reject_fraction: {w.prepare.max_reject_fraction} is not between 0 and 1")
    for key in ("max_length", "rows_per_shard", "num_actors", "max_image_pixels", "max_image_side",
                "max_image_aspect_ratio", "video_frames", "max_video_bytes"):
        if getattr(w.prepare, key) < 1:
            raise WorkflowError(f"prepare.{key}: {getattr(w.prepare, key)} must be at least 1")
    if w.prepare.video_fps < 0:
        raise WorkflowError(f"prepare.video_fps: {w.prepare.video_fps} must be 0 (spread over the clip) or more")
    validate_evaluate(w.evaluate)
    validate_serve(w.serve)
    validate_ablations(w)


def validate_ablations(w: Workflow) -> None:
    """Each ablation is a mapping of dotted keys to values that makes a valid workflow of its own."""
    from llava_core.ablations import ablated

    if not isinstance(w.ablations, dict):
        raise WorkflowError("ablations: expected a mapping of name -> {dotted.key: value}")
    for name, changes in w.ablations.items():
        if not isinstance(changes, dict) or not changes:
            raise WorkflowError(f"ablations.{name}: expected a mapping of dotted keys to values, e.g. "
                                f"{{prepare.image_aspect_ratio: pad}}")
        try:
            ablated(w, name)
        except WorkflowError as error:
            raise WorkflowError(f"ablations.{name}: {error}") from None


# The `prepare.image_aspect_ratio` values each family's model takes; N: the tiles' worth of features past which
# OneVision shrinks the feature map (anyres_max_9 in its recipe).
IMAGE_LAYOUTS = {"llava": ("pad", "square"), "llava_next": ("anyres", "pad"), "llava_onevision": ("anyres_max_N", "pad")}


def layout_fits(layout: str, family_name: str) -> bool:
    import re

    return any(re.fullmatch(allowed.replace("_N", r"_[1-9][0-9]*"), layout) for allowed in IMAGE_LAYOUTS[family_name])


def validate_model(w: Workflow) -> None:
    """The family is known and the image layout is one its model can take; an empty layout becomes the family's."""
    from llava_core.model.families import family

    if w.model.family not in MODEL_FAMILIES:
        close = difflib.get_close_matches(w.model.family, MODEL_FAMILIES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise WorkflowError(f"model.family: {w.model.family!r} is not one of {list(MODEL_FAMILIES)}{hint}")
    if not w.prepare.image_aspect_ratio:
        w.prepare.image_aspect_ratio = family(w.model.family).image_layout
    if not layout_fits(w.prepare.image_aspect_ratio, w.model.family):
        raise WorkflowError(f"prepare.image_aspect_ratio: {w.prepare.image_aspect_ratio!r} does not fit model.family "
                            f"{w.model.family}, which takes {' or '.join(IMAGE_LAYOUTS[w.model.family])}")


def validate_evaluate(e: EvaluateSettings) -> None:
    if MAIN_EVAL_SET in e.sets and e.questions:
        raise WorkflowError(f"evaluate.sets.{MAIN_EVAL_SET}: the name is taken by evaluate.questions; rename the set")
    if e.questions and not e.answers:
        raise WorkflowError("evaluate.answers: required with evaluate.questions (LLaVA layout)")
    for name, s in e.sets.items():
        where = f"evaluate.sets.{name}"
        if s.layout not in EVAL_LAYOUTS:
            raise WorkflowError(f"{where}.layout: {s.layout!r} is not one of {list(EVAL_LAYOUTS)}")
        if not s.questions:
            raise WorkflowError(f"{where}.questions: required")
        if s.layout == "llava" and not s.answers:
            raise WorkflowError(f"{where}.answers: required for the llava layout")
        if s.circular and s.layout != "choice":
            raise WorkflowError(f"{where}.circular: only multiple choice (layout: choice) has options to rotate")
        if s.limit < 0:
            raise WorkflowError(f"{where}.limit: {s.limit} is negative; 0 means all questions")
    marked = [name for name, s in e.sets.items() if s.primary]
    if len(marked) > 1:
        raise WorkflowError(f"evaluate.sets: {', '.join(marked)} are all marked primary; mark one")
    for key in ("max_new_tokens", "batch_size", "num_actors"):
        if getattr(e, key) < 1:
            raise WorkflowError(f"evaluate.{key}: {getattr(e, key)} must be at least 1")
    if e.endpoint is not None:
        if not e.endpoint.url.startswith(("http://", "https://")):
            raise WorkflowError(f"evaluate.endpoint.url: {e.endpoint.url!r} is not an http(s) URL")
        if not e.endpoint.model:
            raise WorkflowError("evaluate.endpoint.model: required (the model id the endpoint answers to, "
                                "see its /v1/models)")
        if e.endpoint.concurrency < 1:
            raise WorkflowError(f"evaluate.endpoint.concurrency: {e.endpoint.concurrency} must be at least 1")


def validate_train_stage(name: str, stage: TrainStageSettings) -> None:
    if stage.zero_stage not in (0, 1, 2, 3):
        raise WorkflowError(f"{name}.zero_stage: {stage.zero_stage} is not a DeepSpeed ZeRO stage; use 0, 1, 2 or 3")
    if stage.offload_params and stage.zero_stage != 3:
        raise WorkflowError(f"{name}.offload_params: needs zero_stage 3 (ZeRO 1/2 keep parameters on the device)")
    if stage.offload_optimizer and stage.zero_stage not in (1, 2, 3):
        raise WorkflowError(f"{name}.offload_optimizer: needs zero_stage 1, 2 or 3")
    if stage.max_steps < 0:
        raise WorkflowError(f"{name}.max_steps: {stage.max_steps} is negative; use 0 to run the epochs")
    if stage.sampling not in SAMPLING:
        raise WorkflowError(f"{name}.sampling: {stage.sampling!r} is not one of {list(SAMPLING)}")
    for key, allowed in (("attn_implementation", ATTN_IMPLEMENTATIONS), ("loss_normalization", LOSS_NORMALIZATIONS)):
        if getattr(stage, key) not in allowed:
            raise WorkflowError(f"{name}.{key}: {getattr(stage, key)!r} is not one of {list(allowed)}")
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
    if stage.init_projector and name == "align":
        raise WorkflowError(f"{name}.init_projector: align trains the projector from scratch; an official projector "
                            f"is where the stage after it (knowledge or instruct) starts")
    if stage.packing and stage.sampling == "modality_grouped":
        raise WorkflowError(f"{name}.packing: packs rows of any modality together; use sampling random or "
                            f"length_grouped with packing")


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
