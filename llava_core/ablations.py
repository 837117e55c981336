"""Ablations: sibling runs of a workflow with a few settings changed, compared with it per eval category.

`ablations: {pad: {prepare.image_aspect_ratio: pad}}` in a workflow runs `<name>-pad` (prepare to evaluate, with its
own run directory, cached like any run) after the workflow's own evaluate, and writes into the workflow's
summary.json, under `ablations.pad`: the sibling's accuracy and per-category accuracy, and how much the workflow's own
run is ahead of it overall and per category. The question an ablation answers ("does AnyRes earn its keep?") is
then read off one file, and is answered on the same data, budget and seed.
"""
from __future__ import annotations

from llava_core.config import Workflow, ablated

# What an ablation compares: the primary eval set's headline numbers, as the evaluate stage reports them.
COMPARED = ("accuracy", "blind_accuracy")


def comparison(own: dict, sibling: dict) -> dict:
    """The sibling's evaluate numbers, and how far the workflow's own are ahead (positive: its own are better)."""
    result = {key: sibling.get(key) for key in COMPARED if key in sibling}
    result["by_category"] = sibling.get("by_category", {})
    if "accuracy" in own and "accuracy" in sibling:
        result["accuracy_gain"] = round(own["accuracy"] - sibling["accuracy"], 4)
    result["by_category_gain"] = {category: round(value - sibling["by_category"][category], 4)
                                  for category, value in own.get("by_category", {}).items()
                                  if category in sibling.get("by_category", {})}
    return result


def run_ablations(w: Workflow, own_summary: dict, run_stages) -> dict:
    """Run every ablation through evaluate (`run_stages(workflow) -> summary`) and compare it with `own_summary`."""
    results = {}
    for name in w.ablations:
        sibling = ablated(w, name)
        print(f"\n==================== ablation {name}: {w.ablations[name]} ({sibling.run_dir}) "
              f"====================", flush=True)
        summary = run_stages(sibling)
        results[name] = {"run_dir": sibling.run_dir, "settings": w.ablations[name],
                         **comparison(own_summary.get("evaluate", {}), summary.get("evaluate", {}))}
        print(f"[ablation {name}] {format_comparison(own_summary.get('evaluate', {}), results[name])}", flush=True)
    return results


def format_comparison(own: dict, result: dict) -> str:
    parts = [f"accuracy {own.get('accuracy')} vs {result.get('accuracy')} ({result.get('accuracy_gain', 0):+})"]
    parts += [f"{category} {own['by_category'][category]} vs {result['by_category'][category]} ({gain:+})"
              for category, gain in result["by_category_gain"].items()]
    return "; ".join(parts)
