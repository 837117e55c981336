"""Scoring of every eval layout against numbers worked out by hand, through the stage's own entry points.

Each test writes a few dozen questions in a benchmark's layout, answers them with fixed predictions (no model: the
numbers must follow from the predictions alone), and checks `load_eval_set` + `score_set`, or the whole
`evaluate_sets` pass that the stage runs (files, metrics, report), against counts made by hand in the test.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from fractions import Fraction

import pytest
from PIL import Image

from llava_core.config import EvalSetSettings, EvaluateSettings, WorkflowError, load_workflow
from llava_core.eval.evaluate import evaluate_sets, stage_metrics
from llava_core.eval.layouts import OPTION_LETTER, SHORT_ANSWER, EvalSetError, load_eval_set
from llava_core.eval.scoring import score_set
from llava_core.eval.vqa_answers import normalise_answer, process_punctuation

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
        return {q.key: ("no" if q.blank else table[q.text]) for q in queries}
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
        {"question_id": 7, "multiple_choice_answer": "red",
         "answers": [{"answer": "red"}] * 9 + [{"answer": "pink"}]}]}))
    s = EvalSetSettings(layout="vqa", questions=str(tmp_path / "q.json"), answers=str(tmp_path / "a.json"),
                        image_folder=image_folder, image_template="img{image_id}.png")
    items = load_eval_set(s)
    assert [i.image_path for i in items] == [f"{image_folder}/img2.png", f"{image_folder}/img3.png"]
    score = score_set("vqa", items, ["pink", "Circle"])
    assert score.metrics["accuracy"] == float((Fraction(3, 10) + 1) / 2)  # "pink": one human of ten
    assert score.metrics["exact_match"] == 0.5


# The official VQA answer processing (EvalAI's processor; vqaEval.py's processPunctuation / processDigitArticle),
# each output worked out by hand from its rules.
ANSWER_PROCESSING = [
    ("dont", "don't"), ("Isnt", "isn't"), ("wont", "won't"), ("youre right", "you're right"),  # contractions
    ("two", "2"), ("None", "0"), ("Ten", "10"),  # number words
    ("3.5", "3.5"), ("2.", "2"), ("Mr. Smith", "mr smith"),  # a period stays only before a digit
    ("well-known", "well known"), ("left/right", "left right"), ("yes!", "yes"),  # a mark inside a word: a space
    ("left / right", "left right"),  # a mark beside a space is deleted
    ("1,000", "1000"), ("1,000 people", "1000 people"),  # commas go before anything else
    ("The dog.", "dog"), ("an apple", "apple"), ("A", ""),  # articles
    ("It's red", "it 's red"), ("10:30", "10:30"), ("50%", "50%"), ("\tred\ncar ", "red car"),
]


@pytest.mark.parametrize("answer, processed", ANSWER_PROCESSING)
def test_answers_are_processed_as_the_vqa_evaluation_does(answer, processed):
    assert normalise_answer(answer) == processed


def test_a_comma_between_digits_deletes_every_mark():
    """vqaEval's commaStrip rule, which EvalAI's processor keeps (its own comma removal comes first, so a test)."""
    assert process_punctuation("3,5-6") == "356" and process_punctuation("3-6") == "3 6"


def test_vqa_scores_follow_the_official_processing(tmp_path, image_folder):
    """The soft accuracy counts the references that equal the prediction once both are processed."""
    cases = [  # (prediction, references, matches after processing)
        ("well-known", ["well known"] * 2 + ["wellknown"] * 8, 2),  # no longer merged with "wellknown"
        ("3.5", ["3.5"] + ["35"] * 9, 1),  # no longer "35"
        ("Dont", ["don't"] * 6 + ["no"] * 4, 6),
        ("1,000", ["1000"] * 3 + ["100"] * 7, 3),
        ("The two dogs.", ["2 dogs"] * 2 + ["dogs"] * 8, 2),
    ]
    questions = [{"question_id": i, "image": "img0.png", "question": f"q{i}", "answers": refs}
                 for i, (_, refs, _) in enumerate(cases)]
    items = load_eval_set(EvalSetSettings(layout="vqa", questions=write_jsonl(tmp_path / "v.jsonl", questions),
                                          image_folder=image_folder))
    score = score_set("vqa", items, [prediction for prediction, _, _ in cases])
    expected = [VQA_BY_MATCHES.get(k, Fraction(1)) for _, _, k in cases]
    assert [r["score"] for r in score.rows] == [float(e) for e in expected]
    assert score.metrics["accuracy"] == float(sum(expected) / len(cases))
    assert score.metrics["exact_match"] == float(Fraction(1, 5))  # only "don't" is also the most common reference


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
    assert score.metrics["per_category"]["adversarial"]["f1"] == 0.0  # no positives: precision and recall are 0


# LLaVA's POPE: three split files. Labels and answers per split, and what each split scores, by hand:
# adversarial: TP 2, FN 1, FP 1, TN 2; popular: TP 3, FP 2, TN 1; random: "No" throughout: TN 3, FN 3.
POPE_LABELS = ["yes", "yes", "yes", "no", "no", "no"]
POPE_SPLIT_ANSWERS = {"adversarial": ["Yes", "Yes", "No", "Yes", "No", "No"],
                      "popular": ["Yes", "Yes", "Yes", "Yes", "Yes", "No"],
                      "random": ["No"] * 6}
POPE_SPLIT_METRICS = {
    "adversarial": {"accuracy": Fraction(4, 6), "precision": Fraction(2, 3), "recall": Fraction(2, 3),
                    "f1": Fraction(2, 3), "yes_ratio": Fraction(3, 6), "count": 6},
    "popular": {"accuracy": Fraction(4, 6), "precision": Fraction(3, 5), "recall": Fraction(1),
                "f1": Fraction(3, 4), "yes_ratio": Fraction(5, 6), "count": 6},  # f1 = 2 * 3/5 * 1 / (8/5)
    "random": {"accuracy": Fraction(1, 2), "precision": Fraction(0), "recall": Fraction(0), "f1": Fraction(0),
               "yes_ratio": Fraction(0), "count": 6},
}


def write_pope_splits(folder):
    """coco_pope_<split>.json as POPE ships them: JSON lines, question ids from 1 in every file."""
    folder.mkdir()
    for split in POPE_SPLIT_ANSWERS:
        write_jsonl(folder / f"coco_pope_{split}.json", [
            {"question_id": i + 1, "image": f"img{(i + len(split)) % 4}.png", "text": f"Is there a thing {i}?",
             "label": label} for i, label in enumerate(POPE_LABELS)])
    return str(folder)


def answers_by_split(items):
    """The answer of each item from POPE_SPLIT_ANSWERS: its split, and its place among that split's items."""
    seen = {split: 0 for split in POPE_SPLIT_ANSWERS}
    answers = []
    for item in items:
        answers.append(POPE_SPLIT_ANSWERS[item.category][seen[item.category]])
        seen[item.category] += 1
    return answers


def assert_pope_split_metrics(metrics):
    assert metrics["per_category"] == {split: {k: float(v) if isinstance(v, Fraction) else v for k, v in m.items()}
                                       for split, m in POPE_SPLIT_METRICS.items()}
    # All 18: TP 5, FP 3, TN 6, FN 4.
    precision, recall = Fraction(5, 8), Fraction(5, 9)
    assert metrics["accuracy"] == float(Fraction(11, 18)) and metrics["yes_ratio"] == float(Fraction(8, 18))
    assert metrics["f1"] == float(2 * precision * recall / (precision + recall)) == float(Fraction(10, 17))


def test_pope_split_files_are_scored_per_split(tmp_path, image_folder):
    """`questions` the folder of split files: each file is a split, its labels inline."""
    s = EvalSetSettings(layout="pope", questions=write_pope_splits(tmp_path / "coco"), image_folder=image_folder)
    items = load_eval_set(s)
    assert [i.category for i in items] == ["adversarial"] * 6 + ["popular"] * 6 + ["random"] * 6
    assert len({i.key for i in items}) == 18 and items[6].question_id == "popular/1"  # every file numbers from 1
    assert items[0].text == f"Is there a thing 0?\n{SHORT_ANSWER}"
    assert_pope_split_metrics(score_set("pope", items, answers_by_split(items)).metrics)


def llava_pope_questions(split_folder):
    """LLaVA's llava_pope_test.jsonl: every split's questions with their category, in an order of its own (here
    the splits interleaved), ids of its own; labels pair with them by position within a split."""
    rows = []
    for i in range(6):
        for split in ("random", "adversarial", "popular"):
            label = json.loads((split_folder / f"coco_pope_{split}.json").read_text().splitlines()[i])
            rows.append({"question_id": 1000 + len(rows), "image": label["image"], "text": label["text"],
                         "category": split})
    return rows


def test_llava_pope_question_file_with_a_folder_of_labels(tmp_path, image_folder):
    folder = write_pope_splits(tmp_path / "coco")
    questions = llava_pope_questions(tmp_path / "coco")
    s = EvalSetSettings(layout="pope", questions=write_jsonl(tmp_path / "llava_pope_test.jsonl", questions),
                        answers=folder, image_folder=image_folder)
    items = load_eval_set(s)
    assert [i.references[0] for i in items if i.category == "popular"] == POPE_LABELS
    assert_pope_split_metrics(score_set("pope", items, answers_by_split(items)).metrics)

    questions[3]["image"] = "img9.png"  # the 2nd random question no longer shows the 2nd random label's image
    wrong = dataclasses.replace(s, questions=write_jsonl(tmp_path / "wrong.jsonl", questions))
    with pytest.raises(EvalSetError, match="line 2 of split 'random'"):
        load_eval_set(wrong)
    short = dataclasses.replace(s, questions=write_jsonl(tmp_path / "short.jsonl",
                                                         llava_pope_questions(tmp_path / "coco")[:-1]))
    with pytest.raises(EvalSetError, match=re.escape("labels without a question") + ".*'popular': 1"):
        load_eval_set(short)


# --- MME: two questions per image, acc + acc+ per subtask ----------------------------------------------------------

# subtask -> per image: (question, label, prediction) twice. MME's parser: "yes"/"no" as they are, else whichever of
# the two the first four characters (lower-cased) contain, else "other".
MME_CASES = {
    "existence": [[("Is there a dog?", "Yes", "Yes"), ("Is there a cat?", "No", "No")],  # both right
                  [("Is there a car?", "Yes", "yes, there is"), ("Is there a bus?", "No", "Yes")],  # one
                  [("Is there a cup?", "Yes", "No."), ("Is there a pen?", "No", "not sure")]],  # one ("not " -> no)
    "OCR": [[("Does it say A?", "Yes", "YES"), ("Does it say B?", "No", "NO")],  # both
            [("Does it say C?", "Yes", "I think yes"), ("Does it say D?", "No", "no")]],  # one ("i th": other)
    "code_reasoning": [[("Does it print 1?", "Yes", "Yes"), ("Does it print 2?", "No", "Yes")],  # one
                       [("Does it loop?", "Yes", "nope"), ("Does it halt?", "No", "No")]],  # one ("nope" -> no)
}
# By hand: existence acc 4/6, acc+ 1/3 -> 66.67 + 33.33 = 100; OCR acc 3/4, acc+ 1/2 -> 75 + 50 = 125;
# code_reasoning acc 2/4, acc+ 0 -> 50. Perception = existence + OCR, cognition = code_reasoning.
MME_SUBTASK_SCORES = {"OCR": (75, 50), "code_reasoning": (50, 0),
                      "existence": (Fraction(200, 3), Fraction(100, 3))}


def mme_rows():
    return [{"question_id": f"{subtask}/{n}.png", "image": f"img{n}.png", "text": f"{q} Please answer yes or no.",
             "answer": label, "category": subtask}
            for subtask, images in MME_CASES.items() for n, pair in enumerate(images) for q, label, _ in pair]


def mme_predictions(items):
    said = {(subtask, f"{q} Please answer yes or no."): p
            for subtask, images in MME_CASES.items() for pair in images for q, _, p in pair}
    return [said[(i.category, i.text.split("\n")[0])] for i in items]


def assert_mme_metrics(metrics):
    assert metrics["subtasks"] == {t: {"acc": float(a), "acc_plus": float(p), "score": float(a + p)}
                                   for t, (a, p) in MME_SUBTASK_SCORES.items()}
    assert metrics["perception"] == 225.0 and metrics["cognition"] == 50.0
    assert metrics["accuracy"] == float(Fraction(9, 14)) and metrics["acc_plus"] == float(Fraction(2, 7))
    assert metrics["unparsed"] == float(Fraction(1, 14)) and metrics["count"] == 14
    assert metrics["by_category"]["OCR"] == 0.75


def test_mme_scores_acc_and_acc_plus_per_subtask(tmp_path, image_folder):
    s = EvalSetSettings(layout="mme", questions=write_jsonl(tmp_path / "mme.jsonl", mme_rows()),
                        image_folder=image_folder)
    items = load_eval_set(s)
    assert items[0].text == f"Is there a dog? Please answer yes or no.\n{SHORT_ANSWER}"
    assert [i.key for i in items[:2]] == ["existence/0.png", "existence/0.png#2"]  # one id per image, as LLaVA's
    assert_mme_metrics(score_set("mme", items, mme_predictions(items)).metrics)

    with pytest.raises(EvalSetError, match="two questions of every image"):
        load_eval_set(EvalSetSettings(layout="mme", questions=s.questions, image_folder=image_folder, limit=3))
    bad = [{**r, "category": "counting"} for r in mme_rows()]
    with pytest.raises(EvalSetError, match="'counting', not one of MME's subtasks"):
        load_eval_set(EvalSetSettings(layout="mme", questions=write_jsonl(tmp_path / "bad.jsonl", bad),
                                      image_folder=image_folder))


def write_mme_release(root):
    """MME_Benchmark_release_version: a .txt of "question<TAB>answer" lines per image, beside it, or (for some
    subtasks) in questions_answers_YN/ with the image in images/; some copies put the subtasks in MME_Benchmark/."""
    for subtask, images in MME_CASES.items():
        base = root / "MME_Benchmark" if subtask == "code_reasoning" else root
        apart = subtask == "OCR"
        image_dir, text_dir = (base / subtask / "images", base / subtask / "questions_answers_YN") if apart else (
            base / subtask, base / subtask)
        image_dir.mkdir(parents=True, exist_ok=True)
        text_dir.mkdir(parents=True, exist_ok=True)
        for n, pair in enumerate(images):
            Image.new("RGB", (16, 16), (n * 60, 0, 0)).save(image_dir / f"{n:04d}.jpg")
            (text_dir / f"{n:04d}.txt").write_text("".join(f"{q} Please answer yes or no.\t{label}\n"
                                                           for q, label, _ in pair))
    (root / "readme.txt").write_text("not a subtask\n")
    (root / "eval_tool" / "Your_Results").mkdir(parents=True)
    (root / "eval_tool" / "Your_Results" / "existence.txt").write_text("0001.jpg\tIs it?\tYes\n")  # not read
    return str(root)


def test_mme_release_folder(tmp_path):
    items = load_eval_set(EvalSetSettings(layout="mme", questions=write_mme_release(tmp_path / "MME")))
    assert len(items) == 14 and {i.category for i in items} == set(MME_CASES)
    ocr = [i for i in items if i.category == "OCR"]
    assert ocr[0].question_id == "OCR/0000.jpg" and ocr[0].image_path == str(tmp_path / "MME/OCR/images/0000.jpg")
    assert ocr[0].references == ["yes"] and ocr[1].references == ["no"]
    assert_mme_metrics(score_set("mme", items, mme_predictions(items)).metrics)


def test_the_stage_pass_reports_mme_scores_and_pope_splits(tmp_path, image_folder):
    table = {f"{q} Please answer yes or no.\n{SHORT_ANSWER}": p
             for images in MME_CASES.values() for pair in images for q, _, p in pair}
    settings = EvaluateSettings(sets={
        "mme": EvalSetSettings(layout="mme", questions=write_mme_release(tmp_path / "MME"), primary=True),
        "pope": EvalSetSettings(layout="pope", questions=write_pope_splits(tmp_path / "coco"),
                                image_folder=image_folder)})
    table.update({f"Is there a thing {i}?\n{SHORT_ANSWER}": "Yes" for i in range(6)})
    results = evaluate_sets(settings, answer_with(table), blank="127,127,127", out_dir=str(tmp_path / "out"), title="t")
    mme = results["mme"]
    assert (mme["perception"], mme["cognition"], mme["subtasks"]["OCR"]["score"]) == (225.0, 50.0, 125.0)
    # The blind stand-in says "no": right on every image's "No" question only: acc 50, acc+ 0 in every subtask.
    assert (mme["blind"]["perception"], mme["blind"]["cognition"], mme["blind"]["acc_plus"]) == (100.0, 50.0, 0.0)
    # POPE, "Yes" throughout: per split TP 3, FP 3.
    assert results["pope"]["per_category"]["random"] == {"accuracy": 0.5, "precision": 0.5, "recall": 1.0,
                                                         "f1": round(2 / 3, 4), "yes_ratio": 1.0, "count": 6}
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<th>perception</th>" in html and "225.0000" in html


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


def test_mmbench_tsv_with_an_image_over_csvs_field_limit(tmp_path):
    """csv's default field limit is 128 KiB; MMBench's inline images are often larger."""
    noise = Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3))  # incompressible: a large PNG
    import base64
    import io

    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    assert len(image) > 200_000
    limit = csv.field_size_limit()
    items = load_eval_set(EvalSetSettings(layout="choice", questions=write_mmbench_tsv(tmp_path / "mm.tsv", image, 3)))
    assert [i.image_b64 == image for i in items] == [True] * 3
    assert [i.references for i in items] == [["A"], ["B"], ["C"]]
    assert csv.field_size_limit() == limit  # put back after the read


# --- hallucination in free answers: CHAIR ---------------------------------------------------------------------------

DESCRIBE = "Describe the image in detail."
# (objects in the image, category, answer): the vocabulary is the union of the objects: red circle, blue square,
# green triangle, circle.
CHAIR_ROWS = [
    (["red circle", "blue square"], "a", "A Red Circle on the left and a blue square."),  # both right, any case
    (["green triangle"], "a", "A green triangle, a red circle and another red circle."),  # red circle: once, made up
    (["circle"], "a", "A red circle."),  # "red circle" (longest first, not also "circle"): not in this image
    (["blue square", "circle"], "b", "Two circles and a BLUE square."),  # the plural is a mention
    (["green triangle"], "b", ""),  # no mention: no hallucination, and nothing recalled
]


def chair_set(tmp_path, image_folder, **settings):
    questions = [{"question_id": f"d{i}", "image": f"img{i % 4}.png", "text": DESCRIBE, "objects": objects,
                  "category": category} for i, (objects, category, _) in enumerate(CHAIR_ROWS)]
    return EvalSetSettings(layout="chair", questions=write_jsonl(tmp_path / "describe.jsonl", questions),
                           image_folder=image_folder, **settings)


def test_chair_by_hand(tmp_path, image_folder):
    items = load_eval_set(chair_set(tmp_path, image_folder))
    assert [item.text for item in items] == [DESCRIBE] * 5  # asked verbatim
    score = score_set("chair", items, [answer for _, _, answer in CHAIR_ROWS])
    assert [r["parsed"] for r in score.rows] == [["red circle", "blue square"], ["green triangle", "red circle"],
                                                 ["red circle"], ["circle", "blue square"], []]
    assert [r["hallucinated"] for r in score.rows] == [[], ["red circle"], ["red circle"], [], []]
    assert [r["correct"] for r in score.rows] == [True, False, False, True, True]
    # 7 mentions (2 + 2 + 1 + 2 + 0), 2 made up, in 2 of 5 answers; 5 of the 7 objects named (2 + 1 + 0 + 2 + 0).
    assert score.metrics == {"accuracy": 3 / 5, "chair_i": 2 / 7, "chair_s": 2 / 5, "recall": 5 / 7,
                             "mentions_per_answer": 7 / 5, "by_category": {"a": 1 / 3, "b": 1.0}, "count": 5}


@pytest.mark.parametrize("objects, shown", [
    (None, "null"), ([], "[]"), ("red circle", '"red circle"'), (["red circle", 3], '["red circle", 3]'),
    (["red circle", " "], '["red circle", " "]'),
])
def test_chair_questions_need_a_list_of_object_phrases(tmp_path, image_folder, objects, shown):
    rows = [{"question_id": 0, "image": "img0.png", "text": DESCRIBE, "objects": ["red circle"]},
            {"question_id": 7, "image": "img1.png", "text": DESCRIBE, **({} if objects is None else
                                                                          {"objects": objects})}]
    path = write_jsonl(tmp_path / "describe.jsonl", rows)
    message = f"{path}: question '7' needs `objects`, a non-empty list of non-empty strings"
    with pytest.raises(EvalSetError, match=re.escape(message) + ".*" + re.escape(shown)):
        load_eval_set(EvalSetSettings(layout="chair", questions=path, image_folder=image_folder))


def test_a_sets_max_new_tokens_reaches_its_queries_blind_ones_too(tmp_path, image_folder):
    """A chair set's descriptions get their own token budget; the other sets keep evaluate.max_new_tokens."""
    pope_q = [{"question_id": i, "image": "img0.png", "text": f"Is there a cat {i}?", "label": "no"} for i in range(2)]
    settings = EvaluateSettings(max_new_tokens=8, sets={
        "describe": chair_set(tmp_path, image_folder, max_new_tokens=48),
        "pope": EvalSetSettings(layout="pope", questions=write_jsonl(tmp_path / "pope.jsonl", pope_q),
                                image_folder=image_folder)})
    asked = []

    def answer(queries):
        asked.extend(queries)
        described = iter(answer for _, _, answer in CHAIR_ROWS)  # the set's questions are asked in file order
        return {q.key: "no" if q.blank or q.text != DESCRIBE else next(described) for q in queries}

    results = evaluate_sets(settings, answer, blank="1,2,3", out_dir=str(tmp_path / "out"), title="t")
    budgets = [(q.text == DESCRIBE, bool(q.blank), q.max_new_tokens) for q in asked]
    assert sorted(set(budgets)) == [(False, False, 8), (False, True, 8), (True, False, 48), (True, True, 48)]
    assert len(asked) == 2 * (5 + 2)  # every question also asked blind
    describe = results["describe"]
    assert (describe["layout"], describe["accuracy"], describe["chair_i"]) == ("chair", 0.6, round(2 / 7, 4))
    # Blind, it says "no": mentions nothing, so hallucinates nothing, and recalls nothing.
    assert (describe["blind"]["chair_s"], describe["blind"]["recall"]) == (0.0, 0.0)
    rows = [json.loads(line) for line in (tmp_path / "out" / "describe" / "predictions.jsonl").read_text().splitlines()]
    assert rows[1]["hallucinated"] == ["red circle"] and rows[1]["blind_parsed"] == []


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
    results = evaluate_sets(settings, answer_with(table), blank="127,127,127", out_dir=str(out), title="t<1>")
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
    # The wrong answers come first (i % 4 == 2: 2, 6, 10 of 6 wrong), escaped.
    assert "Colour of &lt;b&gt;2&lt;/b&gt;?" in html and "<b>2</b>" not in html and "t&lt;1&gt;" in html
    assert "Colour of &lt;b&gt;0&lt;/b&gt;?" not in html  # right, and no room left
    assert "6 of 24 questions answered wrong; not shown: 3 wrong and 18 right" in html
    assert "10 of 20 questions answered wrong; not shown: 7 wrong and 10 right" in html  # POPE: "yes" to every "no"
    assert html.count("data:image/png;base64,") == 6  # 3 examples for each of the two sets


def test_missing_answer_names_the_question(tmp_path, image_folder):
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 5, "image": "img0.png", "text": "?"}])
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 6, "answer": "x"}])
    with pytest.raises(EvalSetError, match="no answer for question '5'"):
        load_eval_set(EvalSetSettings(layout="llava", questions=q, answers=a, image_folder=image_folder))


# --- the workflow's evaluate section -------------------------------------------------------------------------------


def test_quickstart_has_one_primary_llava_set_and_a_chair_set():
    e = load_workflow("workflows/quickstart.yaml").evaluate
    assert list(e.all_sets()) == ["main", "describe"] and e.primary_set() == "main" and e.endpoint is None
    assert e.all_sets()["main"].layout == "llava" and e.all_sets()["main"].questions.startswith("/")
    describe = e.all_sets()["describe"]
    assert describe.layout == "chair" and e.answer_tokens(describe) == 24 > e.answer_tokens(e.all_sets()["main"])


@pytest.mark.parametrize("override, message", [
    ("evaluate.sets={x: {layout: gqa, questions: q.jsonl}}", "evaluate.sets.x.layout: 'gqa' is not one of"),
    ("evaluate.sets={x: {layout: vqa}}", "evaluate.sets.x.questions: required"),
    ("evaluate.sets={x: {layout: vqa, questions: q, circular: true}}", "evaluate.sets.x.circular"),
    ("evaluate.sets={x: {layout: chair, questions: q, answers: a}}", "evaluate.sets.x.answers: the chair layout"),
    ("evaluate.sets={x: {layout: chair, questions: q, max_new_tokens: 0}}", "evaluate.sets.x.max_new_tokens"),
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


def test_the_blind_baseline_sees_a_blank_of_each_images_own_size(tmp_path, image_folder):
    """AnyRes tiles an image by its size: the blind baseline keeps the size (the token count) and loses the content."""
    import io

    from llava_core.eval.backends import image_bytes

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": f"img{i}.png", "text": "What colour?"}) + "\n"
                                 for i in range(4)))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"question_id": i, "answer": "red"}) + "\n" for i in range(4)))
    settings = EvaluateSettings(questions=str(questions), answers=str(tmp_path / "a.jsonl"), image_folder=image_folder)
    asked = []

    def answer(queries):
        asked.extend(queries)
        return {q.key: "red" for q in queries}

    evaluate_sets(settings, answer, blank="10,20,30", out_dir=str(tmp_path / "out"), title="t")
    seen, blind = [q for q in asked if not q.blank], [q for q in asked if q.blank]
    assert len(seen) == len(blind) == 4
    for real, blank in zip(seen, blind):
        original, blanked = (Image.open(io.BytesIO(image_bytes(q))) for q in (real, blank))
        assert blanked.size == original.size == (24 + 8 * int(real.image_path[-5]), 16)
        assert blanked.convert("RGB").getcolors() == [(blanked.width * blanked.height, (10, 20, 30))]
