"""Score predictions against an evaluation set, layout by layout, with the benchmarks' own rules.

Everything is computed with exact fractions and turned into floats at the end, so a score computed by hand in a test
matches to the last bit. `score_set` is the one entry point the evaluate stage uses.
"""
from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction

from llava_core.eval.layouts import EvalItem

ARTICLES = re.compile(r"\b(a|an|the)\b")
# The VQA evaluation maps number words to digits so "two" and "2" agree.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalise_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, number words to digits, collapse spaces (the VQA convention)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = ARTICLES.sub(" ", text)
    return " ".join(NUMBER_WORDS.get(word, word) for word in text.split())


def ratio(part, whole) -> Fraction:
    return Fraction(part, whole) if whole else Fraction(0)


def mean(values: list) -> Fraction:
    return sum(values, Fraction(0)) / len(values) if values else Fraction(0)


# --- short answers (llava, vqa) ---------------------------------------------------------------------------------


def vqa_soft_accuracy(prediction: str, references: list[str]) -> Fraction:
    """VQAv2: min(#humans that gave the answer / 3, 1), averaged over the leave-one-out subsets of the references.
    With one reference it is exact match."""
    answer, refs = normalise_answer(prediction), [normalise_answer(r) for r in references]
    if len(refs) == 1:
        return Fraction(int(answer == refs[0]))
    matches = sum(r == answer for r in refs)
    # Leaving out a reference that matches removes one match from that subset; leaving out another removes none.
    per_subset = [min(Fraction(matches - (r == answer), 3), Fraction(1)) for r in refs]
    return mean(per_subset)


def majority_answer(references: list[str]) -> str:
    """The most common normalised reference, the first listed on a tie (VQAv2's `multiple_choice_answer`)."""
    counts = Counter(normalise_answer(r) for r in references)
    return max(counts, key=lambda answer: (counts[answer], -list(counts).index(answer)))


def score_short_answers(items: list[EvalItem], predictions: list[str]) -> tuple[dict, list[dict]]:
    rows = [{"parsed": normalise_answer(p), "score": vqa_soft_accuracy(p, item.references),
             "correct": normalise_answer(p) == majority_answer(item.references)}
            for item, p in zip(items, predictions)]
    by_category = defaultdict(list)
    for item, row in zip(items, rows):
        by_category[item.category].append(row["score"])
    metrics = {"accuracy": mean([r["score"] for r in rows]),
               "exact_match": mean([Fraction(int(r["correct"])) for r in rows]),
               "by_category": {c: mean(s) for c, s in sorted(by_category.items())},
               "count": len(rows)}
    return metrics, rows


# --- yes/no (pope) ----------------------------------------------------------------------------------------------


def parse_yes_no(prediction: str) -> str:
    """POPE's rule: keep the first sentence, drop commas, and it is "no" if the words contain No / no / not."""
    text = prediction.split(".")[0].replace(",", "")
    words = text.split(" ")
    return "no" if any(w in words for w in ("No", "not", "no")) else "yes"


def yes_no_metrics(pairs: list[tuple[str, str]]) -> dict:
    """pairs of (parsed prediction, label); "yes" is the positive class, as in POPE."""
    tp = sum(p == "yes" and l == "yes" for p, l in pairs)
    fp = sum(p == "yes" and l == "no" for p, l in pairs)
    tn = sum(p == "no" and l == "no" for p, l in pairs)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + sum(p == "no" and l == "yes" for p, l in pairs))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else Fraction(0)
    return {"accuracy": ratio(tp + tn, len(pairs)), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": ratio(tp + fp, len(pairs))}


def score_yes_no(items: list[EvalItem], predictions: list[str]) -> tuple[dict, list[dict]]:
    parsed = [parse_yes_no(p) for p in predictions]
    rows = [{"parsed": a, "score": Fraction(int(a == item.references[0])), "correct": a == item.references[0]}
            for item, a in zip(items, parsed)]
    by_category = defaultdict(list)
    for item, answer in zip(items, parsed):
        by_category[item.category].append((answer, item.references[0]))
    per_category = {c: yes_no_metrics(pairs) for c, pairs in sorted(by_category.items())}
    metrics = {**yes_no_metrics([(a, item.references[0]) for item, a in zip(items, parsed)]),
               "by_category": {c: m["accuracy"] for c, m in per_category.items()},
               "f1_by_category": {c: m["f1"] for c, m in per_category.items()},
               "count": len(rows)}
    return metrics, rows


# --- multiple choice --------------------------------------------------------------------------------------------


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names: a leading letter ("B", "B.", "(B) ..."), else the one option letter that
    stands alone in the text ("The answer is C."), else the option whose text the answer repeats; None if unclear.
    An "A" followed by a lower-case word is the article, not option A."""
    text = prediction.strip()
    leading = re.match(r"^\(?([A-Z])(?:[.):,]|$)", text)
    if leading and leading.group(1) in options:
        return leading.group(1)
    alone = {letter for letter in re.findall(r"\b([A-Z])\b(?!\s+[a-z])", text) if letter in options}
    if len(alone) == 1:
        return alone.pop()
    said = normalise_answer(text)
    repeated = [letter for letter, option in options.items() if said and normalise_answer(option) == said]
    return repeated[0] if len(repeated) == 1 else None


def score_choice(items: list[EvalItem], predictions: list[str]) -> tuple[dict, list[dict]]:
    rows = []
    for item, prediction in zip(items, predictions):
        letter = extract_choice(prediction, item.options)
        rows.append({"parsed": letter, "score": Fraction(int(letter == item.references[0])),
                     "correct": letter == item.references[0]})
    # A question counts once: correct only if every rotation it was asked in is correct (one rotation: plain).
    every_rotation, first_rotation, category = defaultdict(lambda: True), {}, {}
    for item, row in zip(items, rows):
        every_rotation[item.question_id] &= row["correct"]
        category[item.question_id] = item.category
        if item.rotation == 0:
            first_rotation[item.question_id] = row["correct"]
    by_category = defaultdict(list)
    for question_id, correct in every_rotation.items():
        by_category[category[question_id]].append(Fraction(int(correct)))
    metrics = {"accuracy": mean([Fraction(int(c)) for c in every_rotation.values()]),
               "plain_accuracy": mean([Fraction(int(c)) for c in first_rotation.values()]),
               "unparsed": ratio(sum(r["parsed"] is None for r in rows), len(rows)),
               "by_category": {c: mean(s) for c, s in sorted(by_category.items())},
               "count": len(every_rotation), "asked": len(rows)}
    return metrics, rows


# --- the entry point --------------------------------------------------------------------------------------------

SCORERS = {"llava": score_short_answers, "vqa": score_short_answers, "pope": score_yes_no, "choice": score_choice}


@dataclass
class SetScore:
    metrics: dict  # floats (and counts); `accuracy` is the layout's headline number
    rows: list[dict]  # per item: parsed answer, score, correct


def as_floats(value):
    if isinstance(value, dict):
        return {k: as_floats(v) for k, v in value.items()}
    return float(value) if isinstance(value, Fraction) else value


def score_set(layout: str, items: list[EvalItem], predictions: list[str]) -> SetScore:
    if len(items) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} questions")
    metrics, rows = SCORERS[layout](items, predictions)
    return SetScore(as_floats(metrics), [{**r, "score": float(r["score"])} for r in rows])
