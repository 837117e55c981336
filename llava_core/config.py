"""Load a workflow: read the YAML, merge `--set` overrides, check it against the schema, resolve paths, hash settings.

The settings themselves are defined once, in `llava_core/schema.py`, and re-exported here for the code that reads
them. `load_workflow` reports every problem of a file at once, each with its YAML path and, for an unknown key, the
key it probably meant (`instruct.lrr: unknown key (did you mean 'lr'?)`), before any Ray worker starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
import typing
from typing import Any

import annotated_types
import yaml
from pydantic import TypeAdapter, ValidationError
from pydantic.dataclasses import is_pydantic_dataclass

from llava_core.schema import (  # noqa: F401  (re-exported: callers import the sections from here)
    EVAL_LAYOUTS,
    FAMILY_LAYOUTS,
    IMAGE_LAYOUTS,
    LORA_TARGETS,
    MAIN_EVAL_SET,
    MODEL_FAMILIES,
    REMOVED_KEYS,
    SECRET_IN_WORKFLOW,
    SERVE_ENGINES,
    TRAINABLE_PARTS,
    TRAINING_STAGES,
    AutoscalingSettings,
    DatasetSettings,
    EvalEndpointSettings,
    EvalSetSettings,
    EvaluateSettings,
    LoraSettings,
    ModelSettings,
    PreferenceSettings,
    PrepareSettings,
    ScalingSettings,
    ServeSettings,
    SourceSettings,
    SyntheticSettings,
    TinyModelSettings,
    TrainStageSettings,
    VllmSettings,
    Workflow,
    dataset_sources,
    layout_fits,
)


class WorkflowError(ValueError):
    """Problems in a workflow file, reported before any work starts; `problems` holds each `path: message`."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]

    @classmethod
    def of(cls, problems: list[str]) -> WorkflowError:
        if len(problems) == 1:
            return cls(problems[0])
        return cls("\n  ".join([f"{len(problems)} problem(s):", *problems]), problems)


# --- YAML and --set -----------------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-3` is a string; editors (and YAML 1.2) read a number, and so does this."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+0123456789."))


def read_yaml(text_or_file) -> Any:
    return yaml.load(text_or_file, Loader=_YamlLoader)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise WorkflowError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    return key.strip(), read_yaml(raw)


def set_dotted(data: dict, dotted: str, value: Any, create_sections: bool) -> None:
    """`data[a][b][c] = value` for `a.b.c`: the one setter of `--set` and ablations. `--set` may open a section the
    file leaves out (`--set synthetic.seed=1`); an ablation changes a complete workflow, where a missing section is a
    misspelt one."""
    *sections, key = str(dotted).split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {}) if create_sections else node.get(section)
        if not isinstance(node, dict):
            raise WorkflowError(f"{section} is not a section of the workflow")
    node[key] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        try:
            set_dotted(data, *parse_override(text), create_sections=True)
        except WorkflowError as error:
            raise WorkflowError(f"--set {text!r}: {error}") from None
    return data


def ablated(w: Workflow, name: str) -> Workflow:
    """The workflow with ablation `name`'s settings (`ablations: {name: {dotted.key: value}}`) and its own run name;
    no ablations of its own."""
    data = dataclasses.asdict(w)
    data.update(name=f"{w.name}-{name}", ablations={})
    for dotted, value in w.ablations[name].items():
        try:
            set_dotted(data, dotted, value, create_sections=False)
        except WorkflowError as error:
            raise WorkflowError(f"{dotted}: {error}") from None
    return workflow_from_dict(data)


# --- schema errors, each with its YAML path ---------------------------------------------------------------------


@functools.cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def parse(cls, data: Any, where: str = ""):
    """`cls` (a schema section, or the whole Workflow) from a mapping; every problem at once as a WorkflowError."""
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as error:
        raise WorkflowError.of([p for e in error.errors() for p in _problems(cls, e, where)]) from None


def _path(where: str, loc: tuple) -> str:
    text = where
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _bare(tp):
    """The type inside Optional[...] and Annotated[...]."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def _field_at(root, loc: tuple):
    """(section class, its field's FieldInfo or None, the type) that an error location points at."""
    tp, owner, info = root, None, None
    for part in loc:
        tp = _bare(tp)
        if is_pydantic_dataclass(tp):
            owner, info = tp, tp.__pydantic_fields__.get(part)
            if info is None:
                return owner, None, None
            tp = info.annotation
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]  # an item's (a value's) type
    return owner, info, _bare(tp)


TYPE_NAMES = {"int": "int", "float": "float", "string": "str", "bool": "bool", "list": "a list", "dict": "a mapping",
              "dataclass": "a mapping"}


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _problems(root, error: dict, where: str) -> list[str]:
    loc, kind, value = error["loc"], error["type"], error.get("input")
    path = _path(where, loc) or "workflow"
    owner, info, tp = _field_at(root, loc)
    if kind == "section_rules":  # a section's own rules: (key within it, message) each
        return [f"{_path(path, tuple(key.split('.')) if key else ())}: {message}"
                for key, message in error["ctx"]["problems"]]
    if kind == "unexpected_keyword_argument":
        return [f"{path}: {_unknown_key(owner, loc[-1])}"]
    if kind in ("missing", "missing_argument"):
        return [f"{path}: required"]
    if kind == "literal_error":
        return [f"{path}: {_not_one_of(value, typing.get_args(tp))}"]
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return [f"{path}: {_out_of_range(value, info)}"]
    if kind == "too_short":
        choices = typing.get_args(_bare(typing.get_args(tp)[0])) if typing.get_origin(tp) is list else ()
        return [f"{path}: empty" + (f"; choose from {list(choices)}" if choices else "")]
    if kind in ("value_error", "assertion_error"):
        return [f"{path}: {error['msg'].split(', ', 1)[-1]}"]
    type_name = next((name for prefix, name in TYPE_NAMES.items() if kind.startswith(prefix)), None)
    if type_name:
        return [f"{path}: expected {type_name}, got {value!r}"]
    return [f"{path}: {error['msg']}"]


def _unknown_key(owner, key) -> str:
    if (owner, key) in REMOVED_KEYS:
        return REMOVED_KEYS[owner, key]
    names = list(owner.__pydantic_fields__) if owner else []
    close = difflib.get_close_matches(str(key), names, n=1)
    return "unknown key" + (f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(names))})")


def _not_one_of(value: Any, allowed: tuple) -> str:
    close = difflib.get_close_matches(value, [a for a in allowed if isinstance(a, str)], n=1) \
        if isinstance(value, str) else []
    return f"{value!r} is not one of {list(allowed)}" + (f" (did you mean '{close[0]}'?)" if close else "")


def _out_of_range(value: Any, info) -> str:
    bounds = {}
    for constraint in info.metadata if info else ():
        for name in ("ge", "gt", "le", "lt"):
            if isinstance(constraint, getattr(annotated_types, name.capitalize())):
                bounds[name] = getattr(constraint, name)
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    if low is not None and high is not None:
        if "ge" in bounds and "le" in bounds:
            return f"{_show(value)} is not between {low} and {high}"
        return f"{_show(value)} is not in {'[' if 'ge' in bounds else '('}{low}, {high}{']' if 'le' in bounds else ')'}"
    if "ge" in bounds:
        return f"{_show(value)} must be at least {low}"
    if "gt" in bounds:
        return f"must be greater than {low}, got {_show(value)}"
    return f"{_show(value)} must be at most {high}" if "le" in bounds else f"must be less than {high}, got {value}"


# --- what spans sections ------------------------------------------------------------------------------------------


def validate(w: Workflow) -> None:
    """The rules that span sections, every broken one reported at once."""
    problems = [*stage_problems(w), *model_problems(w), *ablation_problems(w)]
    if problems:
        raise WorkflowError.of(problems)


def fitting_micro_batch(global_batch: int, workers: int, micro: int) -> str:
    """The largest micro-batch below `micro` that divides the global batch over the workers, as advice: on more
    nodes the recipe's step (its global batch) stays and each GPU's share of it shrinks."""
    fits = [m for m in range(micro - 1, 0, -1) if global_batch % (workers * m) == 0]
    if not fits:
        return ""
    accumulation = global_batch // (workers * fits[0])
    return f" (micro_batch_size {fits[0]} gives accumulation {accumulation})"


def stage_problems(w: Workflow) -> list[str]:
    problems = []
    for name in w.training_stages():
        stage: TrainStageSettings = getattr(w, name)
        problems += dataset_problems(w, f"{name}.dataset", stage.dataset, wanted_kind(name))
        per_step = w.scaling.num_workers * stage.micro_batch_size
        if stage.global_batch_size % per_step:
            problems.append(
                f"{name}.global_batch_size: {stage.global_batch_size} is not divisible by scaling.num_workers "
                f"x {name}.micro_batch_size = {per_step}; gradient accumulation must be a whole number"
                + fitting_micro_batch(stage.global_batch_size, w.scaling.num_workers, stage.micro_batch_size))
        if w.scaling.num_workers % stage.zero_hpz_partition_size:
            problems.append(f"{name}.zero_hpz_partition_size: {stage.zero_hpz_partition_size} does not divide "
                            f"scaling.num_workers = {w.scaling.num_workers} (it is the ranks of one node)")
        if stage.attn_implementation == "flash_attention_2" and not w.scaling.use_gpu:
            problems.append(f"{name}.attn_implementation: flash_attention_2 runs on GPUs only (scaling.use_gpu is "
                            f"false); use sdpa")
        if stage.init_projector and name == "align":
            problems.append(f"{name}.init_projector: align trains the projector from scratch; an official projector "
                            f"is where the stage after it (knowledge or instruct) starts")
    if w.preference is not None and w.preference.eval_dataset:
        problems += dataset_problems(w, "preference.eval_dataset", w.preference.eval_dataset, "preference")
    return problems + starting_problems(w)


def starting_problems(w: Workflow) -> list[str]:
    """Every training stage has something to start from, and the workflow a model to export."""
    stages = w.training_stages()
    problems = [f"{name}.init_projector: no stage before {name} trains a projector (align is null); name an official "
                f"`mm_projector.bin`" for name in ("knowledge", "instruct")
                if name in stages and stages.index(name) == 0 and not getattr(w, name).init_projector]
    if w.preference is not None and w.instruct is None and not w.preference.init_from:
        problems.append("preference.init_from: instruct is null, so name the model to tune (an export or hub id)")
    if w.instruct is None and w.preference is None:
        problems.append("instruct: null leaves no model to export; keep instruct or add a preference stage")
    return problems


def wanted_kind(stage_name: str) -> str:
    return "preference" if stage_name == "preference" else "conversations"


def dataset_problems(w: Workflow, key: str, dataset: str, kind: str) -> list[str]:
    """The dataset a stage names exists and holds the rows that stage trains on."""
    if dataset not in w.datasets:
        return [f"{key}: {dataset!r} is not a key of datasets ({', '.join(w.datasets) or 'none defined'})"]
    if w.datasets[dataset].kind != kind:
        return [f"{key}: dataset {dataset!r} is of kind {w.datasets[dataset].kind}; this stage trains on "
                f"{kind} rows (datasets.{dataset}.kind)"]
    return []


def model_problems(w: Workflow) -> list[str]:
    """The image layout is one the family's model can take."""
    if layout_fits(w.prepare.image_aspect_ratio, w.model.family):
        return []
    return [f"prepare.image_aspect_ratio: {w.prepare.image_aspect_ratio!r} does not fit model.family "
            f"{w.model.family}, which takes {' or '.join(IMAGE_LAYOUTS[w.model.family])}"]


def with_family_layout(w: Workflow) -> Workflow:
    """An empty `prepare.image_aspect_ratio` becomes the family's own layout."""
    if w.prepare.image_aspect_ratio:
        return w
    layout = FAMILY_LAYOUTS[w.model.family]
    return dataclasses.replace(w, prepare=dataclasses.replace(w.prepare, image_aspect_ratio=layout))


def ablation_problems(w: Workflow) -> list[str]:
    """Each ablation is a mapping of dotted keys to values that makes a valid workflow of its own."""
    problems = []
    for name, changes in w.ablations.items():
        if not changes:
            problems.append(f"ablations.{name}: expected a mapping of dotted keys to values, e.g. "
                            f"{{prepare.image_aspect_ratio: pad}}")
            continue
        try:
            ablated(w, name)
        except WorkflowError as error:
            problems += [f"ablations.{name}: {problem}" for problem in error.problems]
    return problems


# --- loading ------------------------------------------------------------------------------------------------------


def workflow_from_dict(data: Any) -> Workflow:
    """A checked workflow, its local paths absolute, from the mapping a YAML file holds."""
    workflow = with_family_layout(parse(Workflow, data))
    validate(workflow)
    return with_local_paths(workflow)


def read_workflow_file(path: str, overrides: list[str] = ()) -> Any:
    """The mapping a workflow file holds, `--set` overrides applied; not yet checked."""
    try:
        with open(path) as f:
            data = read_yaml(f)
    except FileNotFoundError:
        raise WorkflowError(f"workflow file not found: {path}") from None
    except yaml.YAMLError as error:
        raise WorkflowError(f"{path}: not valid YAML: {error}") from None
    data = data if data is not None else {}
    if isinstance(data, dict):
        data = apply_overrides(data, list(overrides))
    return data


def load_workflow(path: str, overrides: list[str] = ()) -> Workflow:
    return workflow_from_dict(read_workflow_file(path, overrides))


def readable_sections(data: Any) -> Workflow:
    """The workflow as far as it can be read while it has schema errors: each top-level section that is valid on its
    own, and each valid dataset of `datasets`; the rest at their defaults. `validate` checks the paths of this beside
    the schema's errors, so one run reports both."""
    if not isinstance(data, dict):
        return Workflow()
    readable = {}
    for name, value in data.items():
        if name == "datasets" and isinstance(value, dict):
            value = {key: ds for key, ds in value.items() if _reads({"datasets": {key: ds}})}
        if name == "synthetic" and not _reads({name: value}):
            # Its root still tells which missing paths the first run creates.
            value = {"root": value["root"]} if isinstance(value, dict) and "root" in value else {}
        if _reads({name: value}):
            readable[name] = value
    return parse(Workflow, readable)


def _reads(data: dict) -> bool:
    try:
        parse(Workflow, data)
    except WorkflowError:
        return False
    return True


def serve_settings_from_dict(data: Any, where: str = "serve") -> ServeSettings:
    """Serve settings from a mapping (a workflow's `serve:` section, a Serve config's args), checked like a workflow."""
    return parse(ServeSettings, data, where)


def with_local_paths(w: Workflow) -> Workflow:
    """The workflow with its local paths absolute: Ray workers run in other working directories. Hub ids and
    remote URIs stay as they are; a base model path is made absolute only where it exists (or the quickstart will
    create it), as a hub id looks like a relative path."""
    import os

    from llava_core import storage

    def local(path: str) -> str:
        return path if not path or storage.is_remote(path) else os.path.abspath(path)

    def absolute(section, *names: str):
        return dataclasses.replace(section, **{name: local(getattr(section, name)) for name in names})

    datasets = {name: dataclasses.replace(absolute(ds, "path", "image_folder"),
                                          sources=[absolute(s, "path", "image_folder") for s in ds.sources])
                for name, ds in w.datasets.items()}
    files = ("questions", "answers", "image_folder")
    evaluate = dataclasses.replace(absolute(w.evaluate, *files),
                                   sets={name: absolute(s, *files) for name, s in w.evaluate.sets.items()})
    models = [attr for attr in ("vision_tower", "llm")
              if w.synthetic is not None or os.path.exists(getattr(w.model, attr))]
    synthetic = w.synthetic and absolute(w.synthetic, "root")
    preference = w.preference  # the model it starts from: a path where one exists, else a hub id
    if preference is not None and preference.init_from and os.path.exists(preference.init_from):
        preference = absolute(preference, "init_from")
    return dataclasses.replace(w, datasets=datasets, evaluate=evaluate, model=absolute(w.model, *models),
                               synthetic=synthetic, preference=preference)


def settings_hash(*parts: Any) -> str:
    """A stable fingerprint of settings: a stage reruns when the hash of what produced it changes."""
    def plain(obj):
        return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
