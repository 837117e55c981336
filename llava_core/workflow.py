"""The stage runner: prepare -> align -> [knowledge] -> instruct -> [preference] -> export -> evaluate -> serve, in one
Ray job.

Each stage reads the previous stage's output from the run directory and ends by writing `_stage.json` with the hash of
the settings (and upstream hashes) that produced it. A stage whose marker matches is skipped, so running a workflow
again goes straight to what changed; a changed setting reruns that stage and every stage after it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from llava_core import storage
from llava_core.config import Workflow, WorkflowError, settings_hash
from llava_core.data.rows import OUTPUT_COLUMNS, ROW_GROUP_ROWS
from llava_core.logs import init_ray
from llava_core.train.metrics import read_history

log = logging.getLogger(__name__)

STAGES = ("prepare", "align", "knowledge", "instruct", "preference", "export", "evaluate", "serve")
OPTIONAL_STAGES = ("align", "knowledge", "instruct", "preference")  # run when the workflow configures them


@dataclass
class RunContext:
    workflow: Workflow
    run_dir: str
    # where every process reads the base models: a storage URI, a local path or a hub id ("": `needs_base_models`)
    vision_path: str
    llm_path: str
    hashes: dict = field(default_factory=dict)

    def stage_dir(self, stage: str) -> str:
        return storage.join(self.run_dir, stage)


def banner(text: str) -> None:
    print(f"\n{'=' * 20} {text} {'=' * 20}", flush=True)


# --- the stages ------------------------------------------------------------------------------------------------


def stage_prepare(ctx: RunContext) -> dict:
    from llava_core.data.pipeline import run_prepare

    start = named_start(ctx.workflow, ctx.run_dir)  # the checkpoint's location (a hub id: its mirror or fetched copy)
    return run_prepare(ctx.workflow, ctx.vision_path, ctx.llm_path, ctx.stage_dir("prepare"),
                       {name: start for name in checkpoint_datasets(ctx.workflow)})


def checkpoint_datasets(w: Workflow) -> dict[str, str]:
    """Dataset name -> the checkpoint whose own processor prepares it: a preference stage's pairs and held-out pairs
    when the stage starts from a model it names (`init_from`); none otherwise."""
    if w.preference is None or not w.preference.init_from:
        return {}
    return {name: w.preference.init_from for name in (w.preference.dataset, w.preference.eval_dataset) if name}


def named_start(w: Workflow, run_dir: str) -> str:
    """The model a preference stage starts from when it names one (`init_from`; "" when it starts from the instruct
    model): a hub id from the mirror, or fetched once into the run directory. Prepare reads its processor too: its
    pairs must have the token ids and image processing the model was trained with, which a base LLM's tokenizer
    with `<image>` added need not give."""
    if w.preference is None or not w.preference.init_from:
        return ""
    from llava_core.model.base_models import base_model_location

    return base_model_location(w.preference.init_from, w.model.mirror, run_dir)


def saves_full_model(stage_name: str, stage) -> bool:
    """Instruct's (or preference's) output is the export; an earlier stage hands on the projector alone unless it
    trained more."""
    return (stage_name in ("instruct", "preference") or set(stage.trainable) != {"projector"}
            or bool(stage.lora))


def final_model_stage(w: Workflow) -> str:
    """The training stage whose model is exported: preference tuning when configured, else instruct."""
    return "preference" if w.preference is not None else "instruct"


def _train(ctx: RunContext, stage_name: str, stage, init_from: str | None = None) -> dict:
    from llava_core.train.loop import LoopConfig
    from llava_core.train.trainer import run_training_stage

    if stage.init_projector:  # workers run elsewhere: relative paths must be absolute
        stage = dataclasses.replace(stage, init_projector=storage.absolute(stage.init_projector))
    manifest = storage.read_json(storage.join(ctx.stage_dir("prepare"), "manifest.json"))
    prepared = manifest["datasets"][stage.dataset]
    held_out = manifest["datasets"][stage.eval_dataset] if getattr(stage, "eval_dataset", "") else {}
    # The run name carries the settings hash: a crashed run resumes from its checkpoint, changed settings do not.
    config = LoopConfig(
        stage_name=stage_name, stage=stage, scaling=ctx.workflow.scaling, shards=tuple(prepared["shards"]),
        plan_index=prepared.get("plan_index"),  # absent from runs prepared before the index
        output_dir=ctx.stage_dir(stage_name), init_from=init_from, vision_path=ctx.vision_path,
        llm_path=ctx.llm_path, family=ctx.workflow.model.family, image_layout=ctx.workflow.prepare.image_aspect_ratio,
        template=ctx.workflow.datasets[stage.dataset].template, save_model=saves_full_model(stage_name, stage),
        eval_shards=tuple(held_out.get("shards", ())), eval_plan_index=held_out.get("plan_index"))
    run_training_stage(config, run_name=f"{stage_name}-{ctx.hashes[stage_name]}")
    history = read_history(storage.read_text(storage.join(ctx.stage_dir(stage_name), "metrics.jsonl")))
    metrics = {"steps": len(history), "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"]}
    for key in ("samples_per_s", "tokens_per_s", "mfu"):
        values = [r[key] for r in history if r.get(key) is not None]
        if values:
            metrics[key] = round(sum(values) / len(values), 4)
    report = storage.join(ctx.stage_dir(stage_name), "preference_eval.json")  # written when held-out pairs exist
    if held_out and storage.exists(report):
        metrics["preference_eval"] = storage.read_json(report)
    return metrics


def plot_training(ctx: RunContext, stage_name: str) -> str:
    """Every training stage's loss curve so far in one PNG beside `stage_name`'s output."""
    from llava_core import plots

    histories = {}
    for stage in ctx.workflow.training_stages():
        path = storage.join(ctx.stage_dir(stage), "metrics.jsonl")
        if storage.exists(path):
            histories[stage] = read_history(storage.read_text(path))
    target = storage.join(ctx.stage_dir(stage_name), "loss_curves.png")
    storage.write_bytes(target, plots.png(plots.loss_figure(histories)))
    return target


def stage_align(ctx: RunContext) -> dict:
    return _train(ctx, "align", ctx.workflow.align)


def starting_point(ctx: RunContext, stage_name: str):
    """(stage settings, init_from) of a stage after align: the base models plus the stage before's
    `mm_projector.bin` (or an official one the workflow names), as the official stage 2 does; the stage before's
    full model when it trained more than the projector (decided by settings: a stale model/ may be there)."""
    w = ctx.workflow
    stage = getattr(w, stage_name)
    previous = w.training_stages()[w.training_stages().index(stage_name) - 1]
    if stage.init_projector:
        return stage, None
    if saves_full_model(previous, getattr(w, previous)):
        return stage, storage.join(ctx.stage_dir(previous), "model")
    return dataclasses.replace(stage, init_projector=storage.join(ctx.stage_dir(previous), "mm_projector.bin")), None


def stage_knowledge(ctx: RunContext) -> dict:
    """OneVision's stage 1.5: from align's projector, usually the whole model on curated data."""
    return _train(ctx, "knowledge", *starting_point(ctx, "knowledge"))


def stage_instruct(ctx: RunContext) -> dict:
    metrics = _train(ctx, "instruct", *starting_point(ctx, "instruct"))
    metrics["loss_curves"] = plot_training(ctx, "instruct")
    return metrics


def preference_start(ctx: RunContext) -> str:
    """The model preference tuning starts from (and its reference): the one `init_from` names, else this run's
    instruct model."""
    return named_start(ctx.workflow, ctx.run_dir) or storage.join(ctx.stage_dir("instruct"), "model")


def stage_preference(ctx: RunContext) -> dict:
    """Preference tuning from the instruct model (or the model `init_from` names), which is also its reference."""
    w = ctx.workflow
    metrics = _train(ctx, "preference", w.preference, preference_start(ctx))
    metrics["loss_curves"] = plot_training(ctx, "preference")
    return metrics


def stage_export(ctx: RunContext) -> dict:
    from llava_core.model.export import export_hf

    return export_hf(ctx.stage_dir(final_model_stage(ctx.workflow)), ctx.stage_dir("export"))


def stage_evaluate(ctx: RunContext) -> dict:
    """The export's scores; after preference tuning, those of the instruct model it started from beside them
    (`instruct`: this run's, or the one `init_from` names), scored alike (not when evaluate asks a live endpoint:
    that serves one model)."""
    from llava_core.eval.evaluate import run_evaluate

    w, out = ctx.workflow, ctx.stage_dir("evaluate")
    metrics = run_evaluate(ctx.stage_dir("export"), w.evaluate, out, title=f"{w.name}: evaluation")
    if w.preference is not None and w.evaluate.endpoint is None:
        metrics["instruct"] = run_evaluate(preference_start(ctx), w.evaluate, storage.join(out, "instruct"),
                                           title=f"{w.name}: the instruct model")
    return metrics


def stage_serve(ctx: RunContext) -> dict:
    from llava_core.demo import serve_and_demo

    return serve_and_demo(ctx)


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], dict]] = {
    "prepare": stage_prepare, "align": stage_align, "knowledge": stage_knowledge, "instruct": stage_instruct,
    "preference": stage_preference, "export": stage_export, "evaluate": stage_evaluate, "serve": stage_serve,
}


def stage_settings(w: Workflow, stage: str):
    """What a stage's output depends on besides its upstream stages."""
    return {
        # The shards' format too: shards written before the row-group size (one group a shard) would make every
        # random row read its whole shard, and those before the image-token columns cannot feed the trainer.
        "prepare": (w.model, w.datasets, w.prepare, w.synthetic,
                    {"row_group_rows": ROW_GROUP_ROWS, "columns": OUTPUT_COLUMNS},
                    # only where it is set: every other workflow's prepare hash stays as it was
                    *([{"processors_of": checkpoint_datasets(w)}] if checkpoint_datasets(w) else [])),
        "align": (w.align, w.scaling.num_workers),
        "knowledge": (w.knowledge, w.scaling.num_workers),
        "instruct": (w.instruct, w.scaling.num_workers),
        "preference": (w.preference, w.scaling.num_workers),
        "export": (),
        "evaluate": (w.evaluate,),
        "serve": (w.serve,),
    }[stage]


# --- the runner ------------------------------------------------------------------------------------------------


def marker_path(ctx: RunContext, stage: str) -> str:
    return storage.join(ctx.stage_dir(stage), "_stage.json")


def finished(ctx: RunContext, stage: str) -> dict | None:
    path = marker_path(ctx, stage)
    if not storage.exists(path):
        return None
    marker = storage.read_json(path)
    return marker if marker.get("hash") == ctx.hashes[stage] else None


def compute_hashes(w: Workflow) -> dict:
    """Each stage's hash chains its upstream's; a stage the workflow does not run is not in the chain (adding the
    optional knowledge and preference stages left every LLaVA-1.5 run's hashes as they were)."""
    hashes, upstream = {}, ""
    for stage in workflow_stages(w):
        upstream = settings_hash(upstream, stage, *stage_settings(w, stage))
        hashes[stage] = upstream
    return hashes


def workflow_stages(w: Workflow) -> list[str]:
    """The stages of this workflow, in order: every stage but the optional ones it does not configure."""
    return [s for s in STAGES if s not in OPTIONAL_STAGES or getattr(w, s) is not None]


def run_stages(ctx: RunContext, selected: list[str], force: set[str]) -> dict:
    summary_path = storage.join(ctx.run_dir, "summary.json")
    summary = storage.read_json(summary_path) if storage.exists(summary_path) else {}
    summary["workflow"] = ctx.workflow.name
    for stage in selected:
        done = None if stage in force or stage == "serve" else finished(ctx, stage)
        if done:
            banner(f"{stage}: done earlier with the same settings, skipped")
            summary[stage] = {**done["metrics"], "status": "skipped", "seconds": done["seconds"]}
            continue
        banner(f"stage {stage}")
        started = time.time()
        try:
            metrics = STAGE_FUNCTIONS[stage](ctx)
        except BaseException:
            summary[stage] = {"status": "failed", "seconds": round(time.time() - started, 1)}
            storage.write_json(summary_path, summary)
            raise
        seconds = round(time.time() - started, 1)
        if stage != "serve":
            storage.write_json(marker_path(ctx, stage),
                               {"hash": ctx.hashes[stage], "seconds": seconds, "metrics": metrics})
        summary[stage] = {**metrics, "status": "done", "seconds": seconds}
        storage.write_json(summary_path, summary)
        print(f"[{stage}] finished in {seconds:.1f}s: {json.dumps(metrics)}", flush=True)
    storage.write_json(summary_path, summary)
    return summary


def select_stages(w: Workflow, only: str | None, start: str | None) -> tuple[list[str], set[str]]:
    """--only X: just X (forced); --from X: X and after, X forced; default: everything."""
    stages = workflow_stages(w)
    for asked in (only, start):
        if asked and asked not in stages:
            raise WorkflowError(f"--only/--from {asked}: this workflow has no {asked} stage (stages: "
                                f"{', '.join(stages)})")
    if only:
        return [only], {only}
    if start:
        return stages[stages.index(start):], {start}
    return stages, set()


def resolve_base_models(w: Workflow) -> tuple[str, str]:
    """Where every process reads the vision tower and LLM from; the quickstart creates its tiny ones first."""
    from llava_core.model.base_models import base_model_location

    if w.synthetic is not None:
        from llava_core.quickstart.bootstrap import ensure_synthetic

        ensure_synthetic(w)
    if not needs_base_models(w):
        return "", ""
    return (base_model_location(w.model.vision_tower, w.model.mirror, w.run_dir),
            base_model_location(w.model.llm, w.model.mirror, w.run_dir))


def needs_base_models(w: Workflow) -> bool:
    """False for a workflow that only preference-tunes a model it names: that model's processor prepares its pairs
    and its weights start the stage, so a hub id in `model:` would be fetched (Qwen2-7B: ~15 GB) for nothing."""
    return not (w.training_stages() == ["preference"] and set(w.datasets) <= checkpoint_datasets(w).keys())


def needed_stage(w: Workflow, stage: str) -> str | None:
    """The stage whose output `stage` reads: the one before it, except that evaluate and serve read the export and
    a stage starting from an official projector (or model) needs only prepare's shards."""
    if stage in ("evaluate", "serve"):
        return "export"
    starts_elsewhere = stage == "preference" and w.preference.init_from
    if stage in w.training_stages() and (getattr(w, stage).init_projector or starts_elsewhere):
        return "prepare"
    stages = workflow_stages(w)
    return stages[stages.index(stage) - 1] if stages.index(stage) else None


def check_upstream(ctx: RunContext, selected: list[str]) -> None:
    """A stage whose input is neither selected to run nor finished on disk cannot start: say so before any work."""
    for stage in selected:
        needed = needed_stage(ctx.workflow, stage)
        if needed and needed not in selected and not storage.exists(marker_path(ctx, needed)):
            raise WorkflowError(f"--only/--from {stage}: it needs the {needed} stage's output, which is not in "
                                f"{ctx.stage_dir(needed)}; run with --from {needed} (or without --only/--from)")


def add_ablations(ctx: RunContext, summary: dict) -> dict:
    """Run the workflow's ablations (prepare through evaluate, each in its own run directory) and record how this
    run compares with each in its summary.json."""
    from llava_core.ablations import run_ablations

    def run_sibling(sibling: Workflow) -> dict:
        vision, llm = resolve_base_models(sibling)
        sibling_ctx = RunContext(sibling, sibling.run_dir, vision, llm, hashes=compute_hashes(sibling))
        return run_stages(sibling_ctx, [s for s in workflow_stages(sibling) if s != "serve"], set())

    summary["ablations"] = run_ablations(ctx.workflow, summary, run_sibling)
    storage.write_json(storage.join(ctx.run_dir, "summary.json"), summary)
    return summary


def warn_about_resources(w: Workflow) -> None:
    """On a live cluster, say early when no node can host a training worker (an autoscaler may still add one)."""
    import ray

    from llava_core import preflight

    for problem in preflight.resource_problems(w, ray.nodes()):
        print(f"warning: {problem}", flush=True)


def run_workflow(w: Workflow, only: str | None = None, start: str | None = None,
                 exit_after_serve: bool = False) -> dict:
    import ray

    from llava_core import preflight

    preflight.check(w)
    selected, force = select_stages(w, only, start)
    if not ray.is_initialized():
        init_ray(w.ray_address)
    warn_about_resources(w)
    vision, llm = resolve_base_models(w)
    ctx = RunContext(w, w.run_dir, vision, llm, hashes=compute_hashes(w))
    check_upstream(ctx, selected)
    print(f"run directory: {ctx.run_dir}", flush=True)
    # Ablations run before serve: a live deployment holds CPUs or GPUs that their training workers would wait for.
    summary = run_stages(ctx, [s for s in selected if s != "serve"], force)
    if w.ablations and "evaluate" in selected:
        summary = add_ablations(ctx, summary)
    if "serve" in selected:
        summary = run_stages(ctx, ["serve"], force)
        from llava_core.serve.client import serve_until_interrupted, shutdown

        if exit_after_serve:
            shutdown()
        else:
            serve_until_interrupted()
    return summary
