"""Checks of a workflow against the world it will run in, before any worker starts.

The schema (`llava_core/schema.py`, applied by `config.load_workflow`) checks the file on its own: keys, types, values
and how they fit together. This module checks what the file points at: that local paths exist (remote ones on
request: a laptop validating a cluster workflow often has no bucket access), and that each training worker fits on one
node of the cluster. Every problem is reported at once, each with its YAML path and what to do about it.
"""
from __future__ import annotations

import os

from llava_core import storage
from llava_core.config import (
    Workflow,
    WorkflowError,
    dataset_sources,
    read_workflow_file,
    readable_sections,
    workflow_from_dict,
)
from llava_core.model.base_models import looks_local

# No node type of the clouds or of KubeRay's GPU operators has more: a worker is one process on one node.
MAX_GPUS_PER_NODE = 8


def created_on_first_run(w: Workflow) -> set[str]:
    """A quickstart's paths that need not exist yet: its synthetic dataset's files under `synthetic.root`, and the
    stand-in base models, which `quickstart/bootstrap.py` writes wherever `model.vision_tower` and `model.llm` point."""
    if w.synthetic is None:
        return set()
    from llava_core.quickstart.synthetic import dataset_paths  # imported late: it brings PIL

    paths = [*dataset_paths(w.synthetic.root).values(), w.model.vision_tower, w.model.llm]
    return {os.path.abspath(path) for path in paths}


def path_problems(w: Workflow, check_remote: bool = False) -> list[str]:
    """Every path the workflow reads that does not exist, with its YAML path; a quickstart's paths that its first run
    creates are fine while missing, any other missing path (a typo in a copy of the quickstart) is not."""
    wanted = []
    for name, ds in w.datasets.items():
        for i, source in enumerate(dataset_sources(ds)):
            where = f"datasets.{name}.sources[{i}]" if ds.sources else f"datasets.{name}"
            wanted += [(f"{where}.{key}", getattr(source, key)) for key in ("path", "image_folder")
                       if getattr(source, key)]
    for name, s in w.evaluate.all_sets().items():
        where = "evaluate" if name == "main" and w.evaluate.questions else f"evaluate.sets.{name}"
        wanted += [(f"{where}.{key}", getattr(s, key)) for key in ("questions", "answers", "image_folder")
                   if getattr(s, key)]
    wanted += [(f"model.{attr}", getattr(w.model, attr)) for attr in ("vision_tower", "llm")
               if looks_local(getattr(w.model, attr))]
    created = created_on_first_run(w)
    problems = []
    for where, path in wanted:
        remote = storage.is_remote(path)
        if (remote and not check_remote) or (not remote and os.path.abspath(path) in created):
            continue
        if not storage.exists(path):
            hint = ("check the bucket, prefix and credentials (AWS_* variables, AWS_ENDPOINT_URL)" if remote
                    else f"no such file or directory (relative paths are resolved against {os.getcwd()})")
            problems.append(f"{where}: {path} does not exist; {hint}")
    return problems


def resource_problems(w: Workflow, nodes: list[dict] | None = None) -> list[str]:
    """`nodes`: `ray.nodes()` of a live cluster; without it only what no cluster could satisfy is reported."""
    s = w.scaling
    problems = []
    if s.use_gpu and s.gpus_per_worker > MAX_GPUS_PER_NODE:
        problems.append(f"scaling.gpus_per_worker: {s.gpus_per_worker:g} GPUs for one worker, but a worker is one "
                        f"process on one node and nodes have at most {MAX_GPUS_PER_NODE}; use more workers "
                        f"(scaling.num_workers) with one GPU each")
    if not nodes:
        return problems
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    need = "GPU" if s.use_gpu else "CPU"
    per_worker = s.gpus_per_worker if s.use_gpu else s.cpus_per_worker
    largest = max((r.get(need, 0) for r in alive), default=0)
    if largest < per_worker:
        problems.append(f"scaling.{'gpus' if s.use_gpu else 'cpus'}_per_worker: {per_worker} {need}s per worker, but "
                        f"the largest node of this cluster has {largest:g}; lower it, or add a node type that has "
                        f"enough (an autoscaling cluster may still provide one)")
    return problems


def world_problems(w: Workflow, check_remote: bool = False, nodes: list[dict] | None = None) -> list[str]:
    return path_problems(w, check_remote) + resource_problems(w, nodes)


def check(w: Workflow, check_remote: bool = False, nodes: list[dict] | None = None) -> None:
    problems = world_problems(w, check_remote, nodes)
    if problems:
        raise WorkflowError.of(problems)


def check_file(path: str, overrides: list[str] = (), check_remote: bool = False) -> Workflow:
    """The workflow of a file, or a WorkflowError with every problem at once: the schema's and the rules across
    sections, then what the file points at (the paths of the sections that could be read)."""
    data = read_workflow_file(path, overrides)
    try:
        workflow = workflow_from_dict(data)
    except WorkflowError as error:
        raise WorkflowError.of([*error.problems, *world_problems(readable_sections(data), check_remote)]) from None
    check(workflow, check_remote)
    return workflow
