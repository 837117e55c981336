"""Scoring of every eval layout against numbers worked out by hand, through the stage's own entry points.

Each test writes a few dozen questions in a benchmark's layout, answers them with fixed predictions (no model: the
numbers must follow from the predictions alone), and checks `load_eval_set` + `score_set`, or the whole
`evaluate_sets` pass that the stage runs (files, metrics, report), against counts made by hand in the test.
"""
from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest
from PIL import Image

from llava_core.config import EvalSetSettings, EvaluateSettings, WorkflowError, load_workflow
from llava_core.eval.evaluate import evaluate_sets, stage_metrics
from llava_core.eval.layouts import OPTION_LETTER, SHORT_ANSWER, EvalSetError, load_eval_set
from llava_core.eval.scoring import score_set

CATEGORIES = ("adversarial", "popular", "random")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (24 + 8 * i, 16), (40 * i, 100, 200 - 40 * i)).save(folder / f"img{i}.png")
    return str(folder)


def answer_with(table: dict):
    """A stand-in for a model: fixed predictions looked up by prompt text; the blind baseline always says "no"."""
    def answer(queries):
        return {q.key: ("no" if q.image_b64 else table[q.text]) for q in queries}
    return answer


# --- short-answer VQA: soft accuracy over 10 references ------------------------------------------------------------

# VQAv2 accuracy of an answer k of the 10 humans gave: the mean over the 10 leave-one-out subsets of
# min(matches in the subset / 3, 1). k=1: 1 subset with 0 matches, 9 with 1 -> 9 * 1/3 / 10 = 3/10.
# k=2: 2 subsets with 1, 8 with 2 -> (2/3 + 16/3) / 10 = 6/10. k=3: 3 with 2, 7 with 3 -> (2 + 7) / 10 = 9/10.
# k>=4: every subset has at least 3 -> 1.
VQA_BY_MATCHES = {0: Fraction(0), 1: Fraction(3, 10), 2: Fraction(6, 10), 3: Fraction(9, 10)}


def vqa_rows(n=30):
    questions, predictions, expected, exact = [], {}, [], []
    for i in range(n):
        k = i % 7  # 0..6 humans said "two"; the others said "three"
        refs = ["two"] * k + ["three"] * (10 - k)
        text = f"How many objects are in picture {i}?"
        questions.append({"question_id": i, "image": f"img{i % 4}.png", "question": text,
                          "answers": [{"answer": a, "answer_id": j} for j, a in enumerate(refs)],
                          "category": "counting" if i % 2 else "other"})
        predictions[f"{text}\n{SHORT_ANSWER}"] = "2."  # digits and punctuation normalise to "two"
        expected.append(VQA_BY_MATCHES.get(k, Fraction(1)))
        exact.append(k >= 5)  # the majority is "two" from 5 of 10 on (a 5-5 tie goes to the first listed, "two")
    return questions, predictions, expected, exact


def test_vqa_soft_accuracy_and_exact_match(tmp_path, image_folder):
    questions, predictions, expected, exact = vqa_rows()
    s = EvalSetSettings(layout="vqa", questions=write_jsonl(tmp_path / "vqa.jsonl", questions),
                        image_folder=image_folder)
    items = load_eval_set(s)
    assert items[0].text == f"How many objects are in picture 0?\n{SHORT_ANSWER}"
    assert items[3].image_path == f"{image_folder}/img3.png" and len(items[3].references) == 10
    score = score_set("vqa", items, [predictions[item.text] for item in items])

    assert score.metrics["accuracy"] == float(sum(expected) / 30)
    assert score.metrics["exact_match"] == float(Fraction(sum(exact), 30))
    odd = [e for i, e in enumerate(expected) if i % 2]
    assert score.metrics["by_category"]["counting"] == float(sum(odd) / len(odd))
    assert [r["score"] for r in score.rows] == [float(e) for e in expected]


def test_vqav2_json_files_with_an_image_template(tmp_path, image_folder):
    """VQAv2's own files: questions JSON + annotations JSON, images named from image_id."""
    (tmp_path / "q.json").write_text(json.dumps({"questions": [
        {"question_id": 7, "image_id": 2, "question": "What colour?"},
        {"question_id": 8, "image_id": 3, "question": "What shape?"}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 8, "multiple_choice_answer": "circle", "answers": [{"answer": "circle"}] * 10},
        {"question_id": 7, "multiple_choice_answer": "red", "answers": [{"answer": "red"}] * 9 + [{"answer": "pink"}]}]}))
    s = EvalSetSettings(layout="vqa", questions=str(tmp_path / "q.json"), answers=str(tmp_path / "a.json"),
                        image_folder=image_folder, image_template="img{image_id}.png")
    items = load_eval_set(s)
    assert [i.image_path for i in items] == [f"{image_folder}/img2.png", f"{image_folder}/img3.png"]
    score = score_set("vqa", items, ["pink", "Circle"])
    assert score.metrics["accuracy"] == float((Fraction(3, 10) + 1) / 2)  # "pink": one human of ten
    assert score.metrics["exact_match"] == 0.5


# --- POPE ----------------------------------------------------------------------------------------------------------

# (prediction, what POPE's parser makes of it)
POPE_ANSWERS = [
    ("Yes", "yes"), ("No", "no"), ("Yes, there is a dog.", "yes"), ("no.", "no"),
    ("There is not a cat in the image.", "no"), ("I see a dog. No cats though.", "yes"),  # first sentence only
    ("NO", "yes"),  # POPE matches only No / no / not
    ("No, there is none.", "no"),
]


def test_pope_metrics_by_hand(tmp_path, image_folder):
    questions, labels, table = [], [], {}
    for i in range(32):
        label = "yes" if i % 3 else "no"
        text = f"Is there object {i} in the image?"
        questions.append({"question_id": i, "image": f"img{i % 4}.png", "text": text,
                          "category": CATEGORIES[i % 3]})
        labels.append({"question_id": i, "label": label})
        table[f"{text}\n{SHORT_ANSWER}"] = POPE_ANSWERS[i % 8][0]
    s = EvalSetSettings(layout="pope", questions=write_jsonl(tmp_path / "pope.jsonl", questions),
                        answers=write_jsonl(tmp_path / "labels.jsonl", labels), image_folder=image_folder)
    items = load_eval_set(s)
    score = score_set("pope", items, [table[i.text] for i in items])

    parsed = [POPE_ANSWERS[i % 8][1] for i in range(32)]
    gold = [labels[i]["label"] for i in range(32)]
    tp = sum(p == g == "yes" for p, g in zip(parsed, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(parsed, gold))
    tn = sum(p == g == "no" for p, g in zip(parsed, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(parsed, gold))
    assert (tp, fp, tn, fn) == (10, 6, 5, 11)  # the two patterns repeat every 24 items; counted out as a check
    precision, recall = Fraction(tp, tp + fp), Fraction(tp, tp + fn)
    assert score.metrics["accuracy"] == float(Fraction(tp + tn, 32))
    assert score.metrics["precision"] == float(precision) and score.metrics["recall"] == float(recall)
    assert score.metrics["f1"] == float(2 * precision * recall / (precision + recall))
    assert score.metrics["yes_ratio"] == float(Fraction(tp + fp, 32))
    adversarial = [i for i in range(32) if i % 3 == 0]  # every one labelled "no"
    assert score.metrics["by_category"]["adversarial"] == float(
        Fraction(sum(parsed[i] == "no" for i in adversarial), len(adversarial)))
    assert score.metrics["f1_by_category"]["adversarial"] == 0.0  # no positives: precision and recall are 0


# --- multiple choice, circular ---------------------------------------------------------------------------------------

OPTIONS = ["red", "green", "blue", "yellow"]


def shown_options(prompt: str) -> dict:
    """Letter -> option, read back from the prompt as the model sees it."""
    return dict(re.findall(r"^([A-D])\. (.+)$", prompt, flags=re.M))


def test_multiple_choice_circular_by_hand(tmp_path, image_folder):
    questions = [{"question_id": q, "image": f"img{q % 4}.png", "question": f"Which colour is shape {q}?",
                  "hint": "Look closely." if q == 0 else "", "options": OPTIONS, "answer": "ABCD"[q % 4],
                  "category": "colour" if q < 6 else "other"} for q in range(12)]
    s = EvalSetSettings(layout="choice", questions=write_jsonl(tmp_path / "mc.jsonl", questions),
                        image_folder=image_folder, circular=True)
    items = load_eval_set(s)
    assert len(items) == 12 * 4
    first = items[0].text
    assert first == (f"Look closely.\nWhich colour is shape 0?\nA. red\nB. green\nC. blue\nD. yellow\n{OPTION_LETTER}")
    assert list(shown_options(items[1].text).values()) == ["green", "blue", "yellow", "red"]  # rotated once

    # q % 3 == 0: right in every rotation; == 1: wrong in rotation 2 only; == 2: right in rotation 0 only.
    styles = ["{}", "({})", "The answer is {}.", "{}. because"]
    predictions = []
    for item in items:
        q, k = int(item.question_id), item.rotation
        shown = shown_options(item.text)
        right = next(letter for letter, option in shown.items() if option == OPTIONS[q % 4])
        wrong = next(letter for letter in shown if letter != right)
        correct = q % 3 == 0 or (q % 3 == 1 and k != 2) or (q % 3 == 2 and k == 0)
        predictions.append(styles[k].format(right if correct else wrong))
    predictions[-1] = "I cannot tell"  # q=11 (q % 3 == 2), rotation 3: no letter at all
    score = score_set("choice", items, predictions)

    assert score.metrics["count"] == 12 and score.metrics["asked"] == 48
    assert score.metrics["accuracy"] == float(Fraction(4, 12))  # q = 0, 3, 6, 9
    assert score.metrics["plain_accuracy"] == float(Fraction(12, 12))
    assert score.metrics["unparsed"] == float(Fraction(1, 48))
    assert score.metrics["by_category"] == {"colour": float(Fraction(2, 6)), "other": float(Fraction(2, 6))}


def png_b64(colour) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_mmbench_tsv(path, image: str, n: int = 6):
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    lines = [f"{i}\tWhat colour?\tnan\tred\tgreen\tblue\t\t{'ABC'[i % 3]}\tcolour\t{image}\n" for i in range(n)]
    path.write_text(header + "".join(lines))
    return str(path)


def test_multiple_choice_reads_option_text_and_mmbench_tsv(tmp_path):
    image = png_b64((200, 0, 0))
    write_mmbench_tsv(tmp_path / "mmbench.tsv", image)
    items = load_eval_set(EvalSetSettings(layout="choice", questions=str(tmp_path / "mmbench.tsv")))
    assert items[0].text == f"What colour?\nA. red\nB. green\nC. blue\n{OPTION_LETTER}"
    assert items[0].image_b64 == image and items[0].options == {"A": "red", "B": "green", "C": "blue"}
    # Answers: the option text (right), a letter (right), the article "A" (not option A, so unparsed), a wrong
    # letter, a right letter, and an answer naming two options (unparsed): right for questions 0, 1 and 4.
    score = score_set("choice", items, ["Red", "B", "A blue one", "C", "B", "green or blue"])
    assert [r["parsed"] for r in score.rows] == ["A", "B", None, "C", "B", None]
    assert score.metrics["accuracy"] == float(Fraction(3, 6))


# --- the stage's pass over several sets: files, metrics, report --------------------------------------------------


def test_evaluate_sets_writes_predictions_metrics_and_an_escaped_report(tmp_path, image_folder):
    llava_q = [{"question_id": i, "image": f"img{i % 4}.png", "text": f"Colour of <b>{i}</b>?",
                "category": "colour" if i < 20 else "shape"} for i in range(24)]
    llava_a = [{"question_id": i, "answer": "red" if i % 4 else "The Blue"} for i in range(24)]
    pope_q = [{"question_id": f"p{i}", "image": f"img{i % 4}.png", "text": f"Is there a cat {i}?",
               "label": "yes" if i < 10 else "no"} for i in range(20)]
    table = {f"Colour of <b>{i}</b>?": "blue" if i % 2 == 0 else "red" for i in range(24)}
    table.update({f"Is there a cat {i}?\n{SHORT_ANSWER}": "Yes" for i in range(20)})
    settings = EvaluateSettings(
        questions=write_jsonl(tmp_path / "q.jsonl", llava_q), answers=write_jsonl(tmp_path / "a.jsonl", llava_a),
        image_folder=image_folder, report_examples=3,
        sets={"pope": EvalSetSettings(layout="pope", questions=write_jsonl(tmp_path / "pope.jsonl", pope_q),
                                      image_folder=image_folder)})
    out = tmp_path / "evaluate"
    results = evaluate_sets(settings, answer_with(table), blank="iVBORw0K", out_dir=str(out), title="t<1>")
    metrics = stage_metrics(results, settings.primary_set(), "fixed")

    # llava: i % 4 == 0 -> "blue" is right (6 of 24); i % 4 == 2 -> "blue" is wrong; odd i -> "red" is right (12).
    assert metrics["accuracy"] == round(18 / 24, 4) and metrics["questions"] == 24
    assert metrics["by_category"] == {"colour": round(15 / 20, 4), "shape": round(3 / 4, 4)}
    # the blind stand-in says "no": never right on llava; on POPE right for the 10 "no" labels.
    assert metrics["blind_accuracy"] == 0.0 and metrics["primary"] == "main"
    pope = metrics["sets"]["pope"]
    assert (pope["accuracy"], pope["precision"], pope["recall"], pope["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert pope["blind"]["accuracy"] == 0.5 and pope["blind"]["yes_ratio"] == 0.0

    rows = [json.loads(line) for line in (out / "main" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and rows[0]["prediction"] == "blue" and rows[0]["correct"] is True
    assert rows[2]["correct"] is False and rows[2]["blind_prediction"] == "no"
    assert len((out / "pope" / "predictions.jsonl").read_text().splitlines()) == 20
    html = (out / "report.html").read_text()
    assert "0.7500" in html and "0.5000" in html and "1.0000" in html
    assert "Colour of &lt;b&gt;0&lt;/b&gt;?" in html and "<b>0</b>" not in html and "t&lt;1&gt;" in html
    assert html.count("data:image/png;base64,") == 6  # 3 examples for each of the two sets


def test_missing_answer_names_the_question(tmp_path, image_folder):
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 5, "image": "img0.png", "text": "?"}])
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 6, "answer": "x"}])
    with pytest.raises(EvalSetError, match="no answer for question '5'"):
        load_eval_set(EvalSetSettings(layout="llava", questions=q, answers=a, image_folder=image_folder))


# --- the workflow's evaluate section -------------------------------------------------------------------------------


def test_quickstart_has_one_primary_llava_set():
    e = load_workflow("workflows/quickstart.yaml").evaluate
    assert list(e.all_sets()) == ["main"] and e.primary_set() == "main" and e.endpoint is None
    assert e.all_sets()["main"].layout == "llava" and e.all_sets()["main"].questions.startswith("/")


@pytest.mark.parametrize("override, message", [
    ("evaluate.sets={x: {layout: gqa, questions: q.jsonl}}", "evaluate.sets.x.layout: 'gqa' is not one of"),
    ("evaluate.sets={x: {layout: vqa}}", "evaluate.sets.x.questions: required"),
    ("evaluate.sets={x: {layout: vqa, questions: q, circular: true}}", "evaluate.sets.x.circular"),
    ("evaluate.sets={x: {layout: vqa, questions: q, primary: true}, y: {layout: pope, questions: q, primary: true}}",
     "x, y are all marked primary"),
    ("evaluate.sets={x: {layout: vqa, questions: q, promt_suffix: ''}}", "did you mean 'prompt_suffix'"),
    ("evaluate.endpoint={url: localhost:8000, model: m}", "evaluate.endpoint.url"),
    ("evaluate.endpoint={url: 'http://h:1'}", "evaluate.endpoint.model: required"),
])
def test_bad_evaluate_settings_name_their_path(override, message):
    with pytest.raises(WorkflowError, match=re.escape(message)):
        load_workflow("workflows/quickstart.yaml", [override])


def test_inline_images_are_stored_once_per_question_and_sent_by_path(tmp_path):
    """A circular MMBench question is asked once per rotation; its inline image is written once, then referenced."""
    settings = EvaluateSettings(blind_baseline=False, sets={"mmbench": EvalSetSettings(
        layout="choice", circular=True, questions=write_mmbench_tsv(tmp_path / "mm.tsv", png_b64((0, 0, 200)), n=4))})
    asked = []

    def answer(queries):
        asked.extend(queries)
        return {q.key: "A" for q in queries}

    results = evaluate_sets(settings, answer, blank=None, out_dir=str(tmp_path / "out"), title="mm")
    stored = sorted(p.name for p in (tmp_path / "out" / "mmbench" / "images").iterdir())
    assert [re.sub(r"-[0-9a-f]{12}\.png$", "", name) for name in stored] == ["0", "1", "2", "3"]  # + a hash
    assert len(asked) == 4 * 3 and all(q.image_path.endswith(".png") and not q.image_b64 for q in asked)
    # Always "A": right in exactly one of the three rotations of every question, so never circularly right; in the
    # given order right for questions 0 and 3 (answers A, B, C, A).
    assert results["mmbench"]["accuracy"] == 0.0 and results["mmbench"]["plain_accuracy"] == 0.5
