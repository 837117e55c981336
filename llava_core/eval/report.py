"""`evaluate/report.html`: one self-contained page with the metrics table and, per set, the accuracy and the
image-blind accuracy of each category side by side, then its wrong answers (and, while there is room, right ones).

Images are embedded as base64 PNG thumbnails, so the page can be mailed or opened from a bucket; every piece of text
(questions, answers, set names) is escaped, because predictions are model output and questions are user data.
"""
from __future__ import annotations

import base64
import io
from html import escape

from PIL import Image

from llava_core.data import images

THUMBNAIL = 160  # pixels, the longer side
# Columns of the metrics table, in order; a layout shows the ones it has.
METRIC_COLUMNS = ("accuracy", "exact_match", "plain_accuracy", "acc_plus", "perception", "cognition", "precision",
                  "recall", "f1", "yes_ratio", "unparsed", "chair_i", "chair_s", "mentions_per_answer")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; } .wrong { color: #c62828; }
pre { white-space: pre-wrap; margin: 0; max-width: 36em; }
"""


def thumbnail_b64(data: bytes) -> str:
    image = images.decode_image(data)
    image.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else escape(str(value))


def metrics_table(sets: dict) -> str:
    columns = [c for c in METRIC_COLUMNS if any(c in m for m in sets.values())]
    head = "".join(f"<th>{escape(c)}</th>" for c in ["set", "layout", "questions", *columns, "blind accuracy"])
    body = []
    for name, m in sets.items():
        cells = [escape(name), escape(m["layout"]), number(m["count"])]
        cells += [number(m[c]) if c in m else "" for c in columns]
        cells.append(number(m["blind"]["accuracy"]) if "blind" in m else "")
        body.append("<tr>" + "".join(f'<td class="num">{c}</td>' if i > 1 else f"<td>{c}</td>"
                                     for i, c in enumerate(cells)) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def category_table(metrics: dict) -> str:
    """Accuracy and blind accuracy of each category: where the model looks, and where answer priors alone score."""
    categories = metrics.get("by_category", {})
    if len(categories) < 2:
        return ""
    blind = metrics.get("blind", {}).get("by_category", {})
    head = "<tr><th>category</th><th>accuracy</th>" + ("<th>blind accuracy</th>" if blind else "") + "</tr>"
    rows = "".join(f"<tr><td>{escape(str(c))}</td><td class='num'>{number(v)}</td>"
                   + (f"<td class='num'>{number(blind[c]) if c in blind else ''}</td>" if blind else "") + "</tr>"
                   for c, v in categories.items())
    return f"<table>{head}{rows}</table>"


def reference_text(example: dict) -> str:
    options = example.get("options") or {}
    return " | ".join(f"{r}. {options[r]}" if r in options else r for r in example["references"])


def example_rows(examples: list[dict]) -> str:
    rows = []
    for e in examples:
        mark = '<span class="ok">&#10003;</span>' if e["correct"] else '<span class="wrong">&#10007;</span>'
        blind = f"<br><small>blind: {escape(e['blind_prediction'])}</small>" if "blind_prediction" in e else ""
        rows.append(
            f'<tr><td><img src="data:image/png;base64,{e["thumbnail"]}" alt="{escape(str(e["question_id"]))}"></td>'
            f"<td>{escape(str(e.get('category') or ''))}</td><td><pre>{escape(e['question'])}</pre></td>"
            f"<td>{escape(reference_text(e))}</td><td>{mark} {escape(e['prediction'])}{blind}</td></tr>")
    return ("<table><tr><th>image</th><th>category</th><th>question</th><th>expected</th><th>predicted</th></tr>"
            + "".join(rows) + "</table>")


def answers_summary(name: str, shown: dict) -> str:
    """How many questions were answered wrong, and how many of each kind the table leaves out."""
    examples, wrong, right = shown["examples"], shown["wrong"], shown["right"]
    shown_wrong = sum(not e["correct"] for e in examples)
    left_wrong, left_right = wrong - shown_wrong, right - (len(examples) - shown_wrong)
    text = f"{wrong} of {wrong + right} questions answered wrong"
    if left_wrong or left_right:
        text += (f"; not shown: {left_wrong} wrong and {left_right} right "
                 f"(every answer is in {escape(name)}/predictions.jsonl)")
    return f"<p>{text}.</p>"


def set_section(name: str, metrics: dict, shown: dict) -> str:
    return (f"<h2>{escape(name)} <small>({escape(metrics['layout'])})</small></h2>" + category_table(metrics)
            + answers_summary(name, shown) + example_rows(shown["examples"]))


def render_report(title: str, sets: dict, shown: dict) -> str:
    """sets: name -> metrics (with `layout`, `count`, optionally `blind`); shown: name -> `{examples, wrong, right}`
    (`evaluate.examples_for_report`)."""
    sections = [set_section(name, sets[name], shown[name]) for name in sets]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{metrics_table(sets)}"
            + "".join(sections) + "</body></html>")
