"""The evaluate stage: every eval set of the workflow answered greedily, scored by its benchmark's rules, reported.

Beside each real score it reports the image-blind baseline: the same model and questions with a blank (mean-colour)
image. A model that learned to look scores far above it; one that learned only answer priors does not.

Answers come from the exported model in Ray Data actors, or from a live OpenAI-compatible endpoint when
`evaluate.endpoint` is set; both get the same prompts and image bytes (`llava_core.eval.backends`). Outputs:
`evaluate/<set>/predictions.jsonl`, `evaluate/metrics.json`, `evaluate/report.html`, and the stage metrics (in
`summary.json`): per-set metrics under `sets`, and the primary set's `accuracy` / `blind_accuracy` at the top.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re

from llava_core import storage
from llava_core.config import EvaluateSettings
from llava_core.eval.backends import Query, answer_by_endpoint, answer_in_process, image_bytes
from llava_core.eval.layouts import EvalItem, load_eval_set
from llava_core.eval.report import render_report, thumbnail_b64
from llava_core.eval.scoring import SetScore, normalise_answer, score_set  # noqa: F401 - normalise_answer: API

__all__ = ["run_evaluate", "normalise_answer", "evaluate_sets"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def blank_colour(export_dir: str | None) -> str:
    """The blind baseline's colour, "r,g,b": the export's processor mean (CLIP's without an export), each question's
    image replaced by one of its own size in it (`backends.blank_image`). Only the processor's small config file is
    read: the driver never copies the model."""
    mean = processor_image_mean(export_dir) if export_dir and storage.exists(export_dir) else CLIP_MEAN
    return ",".join(str(int(round(c * 255))) for c in mean)


def processor_image_mean(export_dir: str) -> list[float]:
    """`image_mean` from the export's processor config (transformers 5 writes processor_config.json; older exports
    and llava-hf repos have preprocessor_config.json)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = storage.join(export_dir, name)
        if storage.exists(path):
            config = storage.read_json(path)
            config = config.get("image_processor", config)
            if "image_mean" in config:
                return config["image_mean"]
    return list(CLIP_MEAN)


def image_extension(data: bytes) -> str:
    return ".jpg" if data[:2] == b"\xff\xd8" else ".png" if data[:4] == b"\x89PNG" else ".img"


def file_stem(question_id) -> str:
    """A file name for a question id that came from the eval file: its safe characters, readable, and a short hash of
    the id so that two ids never share a file (`a/b` and `a_b`); never `..`, `/` or a hidden name."""
    text = str(question_id)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:64] or "question"
    return f"{readable}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def store_inline_images(items: list[EvalItem], folder: str) -> None:
    """Write inline images (MMBench's TSV) to the run directory once per question, so that queries carry a path:
    a circular question would otherwise ship its image through Ray once per rotation."""
    written = {}
    for item in items:
        if item.image_b64:
            if item.question_id not in written:
                data = base64.b64decode(item.image_b64)
                written[item.question_id] = storage.join(folder, file_stem(item.question_id) + image_extension(data))
                storage.write_bytes(written[item.question_id], data)
            item.image_path, item.image_b64 = written[item.question_id], ""


def build_queries(sets: dict[str, list[EvalItem]], tokens: dict[str, int],
                  blank: str | None) -> tuple[list[Query], dict]:
    """One query per item (and one more with its image blanked in the colour `blank`, when given), each allowed
    `tokens[set name]` new tokens; keys are indices."""
    queries, where = [], {}
    for name, items in sets.items():
        for index, item in enumerate(items):
            where[(name, index, False)] = str(len(queries))
            queries.append(Query(str(len(queries)), item.text, tokens[name], item.image_path, item.image_b64))
            if blank is not None:
                where[(name, index, True)] = str(len(queries))
                queries.append(Query(str(len(queries)), item.text, tokens[name], item.image_path, item.image_b64,
                                     blank))
    return queries, where


def rounded(metrics: dict) -> dict:
    return {k: rounded(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v
            for k, v in metrics.items()}


def prediction_rows(items: list[EvalItem], predictions: list[str], score: SetScore,
                    blind: list[str] | None, blind_score: SetScore | None) -> list[dict]:
    rows = []
    for i, item in enumerate(items):
        row = {"question_id": item.question_id, "key": item.key, "category": item.category, "question": item.text,
               "references": item.references, "prediction": predictions[i], **score.rows[i]}
        if item.options:
            row.update(options=item.options, rotation=item.rotation)
        if blind is not None:
            row.update(blind_prediction=blind[i], blind_parsed=blind_score.rows[i]["parsed"],
                       blind_correct=blind_score.rows[i]["correct"])
        rows.append(row)
    return rows


def examples_for_report(items: list[EvalItem], rows: list[dict], count: int) -> dict:
    """The answers the report shows, `count` at most: the wrong ones first, then right ones; each question once (a
    circular one by its first rotation, wrong if any rotation is). With how many questions were wrong and right."""
    wrong_ids = {row["question_id"] for row in rows if not row["correct"]}
    first = [i for i, item in enumerate(items) if item.rotation == 0]
    wrong = [i for i in first if items[i].question_id in wrong_ids]
    right = [i for i in first if items[i].question_id not in wrong_ids]
    # The thumbnail's query is only read, never asked: it needs no token budget.
    shown = [{**rows[i], "correct": items[i].question_id not in wrong_ids,
              "thumbnail": thumbnail_b64(image_bytes(Query("", "", 0, items[i].image_path, items[i].image_b64)))}
             for i in (wrong + right)[:count]]
    return {"examples": shown, "wrong": len(wrong), "right": len(right)}


def evaluate_sets(settings: EvaluateSettings, answer, blank: str | None, out_dir: str, title: str) -> dict:
    """Load every set, get all answers in one pass of `answer(queries) -> {key: text}`, score, write, report."""
    configs = settings.all_sets()
    sets = {name: load_eval_set(s) for name, s in configs.items()}
    for name, items in sets.items():
        store_inline_images(items, storage.join(out_dir, name, "images"))
    tokens = {name: settings.answer_tokens(s) for name, s in configs.items()}
    queries, where = build_queries(sets, tokens, blank)
    answers = answer(queries)
    results, examples = {}, {}
    for name, items in sets.items():
        layout = configs[name].layout
        predictions = [answers[where[(name, i, False)]] for i in range(len(items))]
        score = score_set(layout, items, predictions)
        blind = [answers[where[(name, i, True)]] for i in range(len(items))] if blank is not None else None
        blind_score = score_set(layout, items, blind) if blind is not None else None
        rows = prediction_rows(items, predictions, score, blind, blind_score)
        storage.write_text(storage.join(out_dir, name, "predictions.jsonl"),
                           "".join(json.dumps(r) + "\n" for r in rows))
        results[name] = {"layout": layout, **rounded(score.metrics)}
        if blind_score is not None:
            results[name]["blind"] = rounded(blind_score.metrics)
        examples[name] = examples_for_report(items, rows, settings.report_examples)
    storage.write_text(storage.join(out_dir, "report.html"), render_report(title, results, examples))
    return results


def stage_metrics(results: dict, primary: str | None, backend: str) -> dict:
    """Per-set metrics under `sets`; the primary set's headline numbers on top (the summary.json contract)."""
    metrics = {"backend": backend, "primary": primary, "sets": results}
    if primary is not None:
        main = results[primary]
        metrics.update(accuracy=main["accuracy"], questions=main["count"], by_category=main["by_category"])
        if "blind" in main:
            metrics.update(blind_accuracy=main["blind"]["accuracy"], blind_by_category=main["blind"]["by_category"])
    return metrics


def run_evaluate(export_dir: str, settings: EvaluateSettings, out_dir: str, title: str = "evaluation") -> dict:
    if not settings.all_sets():
        print("evaluate: no eval sets in the workflow (evaluate.questions or evaluate.sets); nothing to do", flush=True)
        return {"sets": {}}
    endpoint = settings.endpoint
    blank = blank_colour(export_dir) if settings.blind_baseline else None
    if endpoint is not None:
        def answer(queries):
            return answer_by_endpoint(queries, endpoint)
        backend = f"endpoint {endpoint.url} ({endpoint.model})"
    else:
        def answer(queries):
            return answer_in_process(queries, export_dir, settings.batch_size, settings.num_actors)
        backend = "ray_data"
    results = evaluate_sets(settings, answer, blank, out_dir, title)
    metrics = stage_metrics(results, settings.primary_set(), backend)
    storage.write_json(storage.join(out_dir, "metrics.json"), metrics)
    return metrics
