"""Score predictions against an evaluation set, layout by layout, with the benchmarks' own rules.

Everything is computed with exact fractions and turned into floats at the end, so a score computed by hand in a test
matches to the last bit. `score_set` is the one entry point the evaluate stage uses.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction

from llava_core.eval.layouts import MME_SUBTASKS, EvalItem, mme_pairs
from llava_core.eval.vqa_answers import normalise_answer


def ratio(part, whole) -> Fraction:
    return Fraction(part, whole) if whole else Fraction(0)


def mean(values: list) -> Fraction:
    return sum(values, Fraction(0)) / len(values) if values else Fraction(0)


# --- short answers (llava, vqa) ---------------------------------------------------------------------------------


def vqa_soft_accuracy(prediction: str, references: list[str]) -> Fraction:
    """VQAv2 / TextVQA: min(#humans that gave the answer / 3, 1), averaged over the leave-one-out subsets of the
    references, the prediction and every reference normalised by EvalAI's processor: `_compute_answer_scores` of
    `TextVQAAccuracyEvaluator` in haotian-liu/LLaVA `llava/eval/m4c_evaluator.py` (LLaVA's TextVQA scorer). The
    official VQAv2 `vqaEval.py` (GT-Vision-Lab/VQA) processes the references only when they disagree; the two differ
    only where ten identical references change under processing. With one reference it is exact match."""
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


# --- yes/no (pope, mme) -----------------------------------------------------------------------------------------


def parse_yes_no(prediction: str) -> str:
    """POPE's rule (haotian-liu/LLaVA `llava/eval/eval_pope.py`): keep the first sentence, drop commas, and it is
    "no" if the words contain No / no / not."""
    text = prediction.split(".")[0].replace(",", "")
    words = text.split(" ")
    return "no" if any(w in words for w in ("No", "not", "no")) else "yes"


def yes_no_metrics(pairs: list[tuple[str, str]]) -> dict:
    """pairs of (parsed prediction, label); "yes" is the positive class, as in `eval_pope.py`."""
    tp = sum(p == "yes" and label == "yes" for p, label in pairs)
    fp = sum(p == "yes" and label == "no" for p, label in pairs)
    tn = sum(p == "no" and label == "no" for p, label in pairs)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + sum(p == "no" and label == "yes" for p, label in pairs))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else Fraction(0)
    return {"accuracy": ratio(tp + tn, len(pairs)), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": ratio(tp + fp, len(pairs)), "count": len(pairs)}


def score_yes_no(items: list[EvalItem], predictions: list[str]) -> tuple[dict, list[dict]]:
    """POPE as haotian-liu/LLaVA `llava/eval/eval_pope.py` scores it: accuracy, precision, recall, F1 and yes-ratio,
    over the whole set and per category (LLaVA's three splits, adversarial / popular / random, are categories)."""
    parsed = [parse_yes_no(p) for p in predictions]
    rows = [{"parsed": a, "score": Fraction(int(a == item.references[0])), "correct": a == item.references[0]}
            for item, a in zip(items, parsed)]
    by_category = defaultdict(list)
    for item, answer in zip(items, parsed):
        by_category[item.category].append((answer, item.references[0]))
    per_category = {c: yes_no_metrics(pairs) for c, pairs in sorted(by_category.items())}
    metrics = {**yes_no_metrics([(a, item.references[0]) for item, a in zip(items, parsed)]),
               "by_category": {c: m["accuracy"] for c, m in per_category.items()},
               "per_category": per_category}
    return metrics, rows


def parse_mme(prediction: str) -> str:
    """MME's `parse_pred_ans` (its eval_tool `calculation.py`), on the lower-cased answer: "yes" / "no" as they are,
    else whichever of the two its first four characters contain, else "other" (counted wrong)."""
    answer = prediction.lower()
    if answer in ("yes", "no"):
        return answer
    return "yes" if "yes" in answer[:4] else "no" if "no" in answer[:4] else "other"


def mme_subtask_scores(items: list[EvalItem], correct: list[bool], pairs: list[tuple[int, int]]) -> dict:
    """Per subtask: acc (% of questions right), acc_plus (% of images with both questions right) and their sum, the
    subtask's score, as MME's eval_tool `calculation.py` computes them."""
    questions, images = defaultdict(list), defaultdict(list)
    for pair in pairs:
        subtask = items[pair[0]].category
        questions[subtask] += [correct[i] for i in pair]
        images[subtask].append(all(correct[i] for i in pair))
    scores = {}
    for subtask in sorted(questions):
        acc = 100 * ratio(sum(questions[subtask]), len(questions[subtask]))
        acc_plus = 100 * ratio(sum(images[subtask]), len(images[subtask]))
        scores[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return scores


def score_mme(items: list[EvalItem], predictions: list[str]) -> tuple[dict, list[dict]]:
    """MME as its official eval_tool `calculation.py` scores it (BradyFU/Awesome-Multimodal-Large-Language-Models,
    branch Evaluation, tools/eval_tool.zip; LLaVA's scripts/v1_5/eval/mme.sh runs it): each subtask scores acc +
    acc_plus, in percent; `perception` sums the ten perception subtasks' scores (at most 2000), `cognition` the four
    cognition ones' (at most 800). `accuracy` is the fraction of questions right, `acc_plus` that of images."""
    parsed = [parse_mme(p) for p in predictions]
    correct = [a == item.references[0] for item, a in zip(items, parsed)]
    rows = [{"parsed": a, "score": Fraction(int(c)), "correct": c} for a, c in zip(parsed, correct)]
    pairs = mme_pairs(items)
    subtasks = mme_subtask_scores(items, correct, pairs)
    metrics = {"accuracy": ratio(sum(correct), len(correct)),
               "acc_plus": ratio(sum(all(correct[i] for i in pair) for pair in pairs), len(pairs)),
               **{part: sum((subtasks[t]["score"] for t in names if t in subtasks), Fraction(0))
                  for part, names in MME_SUBTASKS.items()},
               "subtasks": subtasks,
               "by_category": {t: s["acc"] / 100 for t, s in subtasks.items()},
               "unparsed": ratio(parsed.count("other"), len(parsed)),
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


# --- hallucination in free answers (chair) ----------------------------------------------------------------------


def object_phrase(text: str) -> str:
    """An object phrase as mentions are matched: lower case, words separated by single spaces."""
    return " ".join(text.lower().split())


def chair_vocabulary(items: list[EvalItem]) -> list[str]:
    """Every phrase any question of the set lists among its objects, longest first. CHAIR counts mentions of a fixed
    object vocabulary (Rohrbach et al. 2018: COCO's 80 objects and their synonyms); a set's own annotations over many
    images cover the objects its answers can name, so their union is that vocabulary here. With `limit`, it is the
    union over the questions asked."""
    phrases = {object_phrase(o) for item in items for o in item.references}
    return sorted(phrases, key=lambda p: (-len(p), p))


def phrase_pattern(phrase: str) -> re.Pattern:
    """The phrase on word boundaries, any whitespace between its words, in the singular or plural (+s / +es)."""
    words = r"\s+".join(re.escape(word) for word in phrase.split())
    return re.compile(rf"(?<!\w){words}(?:e?s)?(?!\w)")


def mentions(answer: str, vocabulary: list[str]) -> list[str]:
    """The vocabulary's phrases an answer names, each once, in the order they first appear. Phrases are matched
    longest first and a match inside a longer one's is not counted: "a red circle" mentions "red circle", not also
    "circle" (the CHAIR code matches two-word synonyms before single words for the same reason)."""
    text, taken, found = answer.lower(), [], {}
    for phrase in vocabulary:
        for match in phrase_pattern(phrase).finditer(text):
            if not any(match.start() < end and start < match.end() for start, end in taken):
                taken.append(match.span())
                found.setdefault(phrase, match.start())
    return sorted(found, key=found.get)


def score_chair(items: list[EvalItem], predictions: list[str]) -> tuple[dict, list[dict]]:
    """CHAIR (Rohrbach et al. 2018): `chair_i`, the share of object mentions that name something not in the image,
    and `chair_s`, the share of answers with at least one such mention; `recall`, the share of the images' objects the
    answers mention, so that an empty answer cannot look perfect; `mentions_per_answer`. The headline `accuracy` is
    1 - chair_s, the share of answers without a hallucination (an answer is `correct` when it has none), so that a
    chair set reports, and can be primary, as the others do; `by_category` is the same per category."""
    vocabulary = chair_vocabulary(items)
    rows, present, recalled = [], 0, 0
    for item, prediction in zip(items, predictions):
        objects = {object_phrase(o) for o in item.references}
        named = mentions(prediction, vocabulary)
        hallucinated = [m for m in named if m not in objects]
        rows.append({"parsed": named, "hallucinated": hallucinated, "score": Fraction(int(not hallucinated)),
                     "correct": not hallucinated})
        present, recalled = present + len(objects), recalled + len(named) - len(hallucinated)
    by_category = defaultdict(list)
    for item, row in zip(items, rows):
        by_category[item.category].append(row["score"])
    all_mentions = sum(len(r["parsed"]) for r in rows)
    chair_s = ratio(sum(not r["correct"] for r in rows), len(rows))
    metrics = {"accuracy": 1 - chair_s, "chair_i": ratio(sum(len(r["hallucinated"]) for r in rows), all_mentions),
               "chair_s": chair_s, "recall": ratio(recalled, present),
               "mentions_per_answer": ratio(all_mentions, len(rows)),
               "by_category": {c: mean(s) for c, s in sorted(by_category.items())}, "count": len(rows)}
    return metrics, rows


# --- the entry point --------------------------------------------------------------------------------------------

SCORERS = {"llava": score_short_answers, "vqa": score_short_answers, "pope": score_yes_no, "mme": score_mme,
           "choice": score_choice, "chair": score_chair}


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
