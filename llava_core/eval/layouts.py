"""Read evaluation sets in the standard benchmark layouts into one list of `EvalItem`s, prompts included.

Layouts (the `layout` of a set):
- `llava`: LLaVA's eval question files, jsonl of `{question_id, image, text[, category]}`, and an answers jsonl of
  `{question_id, answer}` (or `answers`: a list). The text is asked verbatim: LLaVA's files carry their instruction.
- `vqa`: short-answer VQA. jsonl of `{question_id, image, question|text, answers|answer[, category]}` (answers may be
  in a separate file, as strings or VQAv2's `{"answer": ...}` objects), or VQAv2's own questions/annotations JSON
  files with `image_template` naming the image. Asked with "Answer the question using a single word or phrase."
- `pope`: yes/no in POPE's layout, jsonl of `{question_id, image, text, label[, category]}` (labels may be in a
  separate file, as LLaVA's `llava_pope_test.jsonl` + `coco_pope_*.json` are). Same instruction as `vqa`.
- `choice`: multiple choice, jsonl of `{question_id, image, question, options: [...] | A/B/C/D keys, answer: letter
  [, hint, category]}` or MMBench's TSV (base64 images inline). Options are listed as LLaVA-1.5 does (hint, question,
  "A. ...") and asked with "Answer with the option's letter from the given choices directly.". With `circular`,
  each question is asked once per rotation of its options, as MMBench's circular evaluation does.
"""
from __future__ import annotations

import csv
import io
import json
import string
from dataclasses import dataclass, field

from llava_core import storage
from llava_core.config import EvalSetSettings

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
DEFAULT_SUFFIX = {"llava": "", "vqa": SHORT_ANSWER, "pope": SHORT_ANSWER, "choice": OPTION_LETTER}
LETTERS = string.ascii_uppercase


class EvalSetError(ValueError):
    """An evaluation file that does not fit its layout; the message names the file and the row."""


@dataclass
class EvalItem:
    key: str  # unique in its set: the question id, plus "@k" for the k-th rotation of a circular question
    question_id: str
    text: str  # exactly what the model is asked, instruction included
    references: list[str]  # reference answers; pope: ["yes"|"no"]; choice: [the correct letter]
    image_path: str = ""  # where to read the image, or "" when it is inline
    image_b64: str = ""  # an inline image (MMBench TSV)
    category: str = "all"
    options: dict = field(default_factory=dict)  # choice: letter -> option text, in the order asked
    rotation: int = 0


# --- files ------------------------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict]:
    rows = []
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise EvalSetError(f"{path}:{number}: not valid JSON ({error})") from None
    return rows


def read_rows(path: str) -> list[dict]:
    """jsonl, a JSON array, VQAv2's `{"questions": [...]}` / `{"annotations": [...]}` or a TSV (MMBench)."""
    if path.endswith(".tsv"):
        return list(csv.DictReader(io.StringIO(storage.read_text(path)), delimiter="\t"))
    if path.endswith(".json"):
        try:
            data = json.loads(storage.read_text(path))
        except json.JSONDecodeError:
            return read_jsonl(path)  # POPE's coco_pope_*.json are JSON lines
        if isinstance(data, dict):
            for key in ("questions", "annotations"):
                if isinstance(data.get(key), list):
                    return data[key]
            raise EvalSetError(f"{path}: a JSON object without a 'questions' or 'annotations' list")
        return data
    return read_jsonl(path)


def by_question_id(rows: list[dict], path: str) -> dict[str, dict]:
    table = {}
    for row in rows:
        if "question_id" not in row:
            raise EvalSetError(f"{path}: a row without question_id: {json.dumps(row)[:200]}")
        table[str(row["question_id"])] = row
    return table


def field_of(row: dict, names: tuple[str, ...], path: str):
    for name in names:
        if row.get(name) not in (None, ""):
            return row[name]
    raise EvalSetError(f"{path}: question {row.get('question_id')!r} has none of the fields {list(names)}")


def reference_answers(row: dict, names: tuple[str, ...], path: str) -> list[str]:
    """Reference answers from the first of `names` present: a string or a list (of strings or VQAv2 objects)."""
    value = field_of(row, names, path)
    values = value if isinstance(value, list) else [value]
    return [str(v["answer"] if isinstance(v, dict) else v) for v in values]


def with_suffix(text: str, suffix: str) -> str:
    text = text.strip()
    return text if not suffix or text.endswith(suffix) else f"{text}\n{suffix}"


# --- layouts ----------------------------------------------------------------------------------------------------


def load_eval_set(s: EvalSetSettings) -> list[EvalItem]:
    """The set's questions in file order, each with its prompt, references and image."""
    rows = read_rows(s.questions)
    if s.limit:
        rows = rows[:s.limit]
    answers = by_question_id(read_rows(s.answers), s.answers) if s.answers else {}
    suffix = DEFAULT_SUFFIX[s.layout] if s.prompt_suffix is None else s.prompt_suffix
    reader = {"llava": short_answer_item, "vqa": short_answer_item, "pope": yes_no_item, "choice": choice_items}
    items = []
    for index, row in enumerate(rows):
        row = {**row, "question_id": str(row.get("question_id", row.get("index", index)))}
        # A separate answers file wins over anything the question row carries (LLaVA's files carry a "text").
        answer_row = answers.get(row["question_id"])
        if s.answers and answer_row is None:
            raise EvalSetError(f"{s.answers}: no answer for question {row['question_id']!r} of {s.questions}")
        made = reader[s.layout](row, answer_row or row, s, suffix)
        items += made if isinstance(made, list) else [made]
    if not items:
        raise EvalSetError(f"{s.questions}: no questions")
    return items


def image_of(row: dict, s: EvalSetSettings) -> str:
    name = s.image_template.format(**row) if s.image_template else field_of(row, ("image",), s.questions)
    return name if storage.is_remote(name) or name.startswith("/") else storage.join(s.image_folder, name)


def short_answer_item(row: dict, answer_row: dict, s: EvalSetSettings, suffix: str) -> EvalItem:
    question = field_of(row, ("text", "question"), s.questions)
    source = s.answers or s.questions
    if s.layout == "llava" and not s.answers:
        raise EvalSetError(f"{s.questions}: the llava layout needs an answers file (its question rows carry a "
                           "'text' that is the question, not the answer)")
    keys = ("answer", "answers", "text") if s.layout == "llava" else ("answers", "answer", "multiple_choice_answer")
    references = reference_answers(answer_row, keys, source)
    return EvalItem(row["question_id"], row["question_id"], with_suffix(question, suffix), references,
                    image_path=image_of(row, s), category=str(row.get("category") or "all"))


def yes_no_item(row: dict, answer_row: dict, s: EvalSetSettings, suffix: str) -> EvalItem:
    question = field_of(row, ("text", "question"), s.questions)
    label = str(field_of(answer_row, ("label", "answer"), s.answers or s.questions)).strip().lower()
    if label not in ("yes", "no"):
        raise EvalSetError(f"{s.answers or s.questions}: question {row['question_id']!r} has label {label!r}, "
                           "not 'yes' or 'no'")
    return EvalItem(row["question_id"], row["question_id"], with_suffix(question, suffix), [label],
                    image_path=image_of(row, s), category=str(row.get("category") or "all"))


def options_of(row: dict) -> list[str]:
    if isinstance(row.get("options"), list):
        return [str(o) for o in row["options"]]
    # MMBench columns A, B, C, D; a missing option is empty (or "nan" when the TSV was written by pandas).
    return [str(row[c]) for c in LETTERS if c in row and str(row[c]).strip() not in ("", "nan", "None")]


def choice_items(row: dict, answer_row: dict, s: EvalSetSettings, suffix: str) -> list[EvalItem]:
    options = options_of(row)
    if len(options) < 2:
        raise EvalSetError(f"{s.questions}: question {row['question_id']!r} has fewer than two options")
    answer = str(field_of(answer_row, ("answer", "label"), s.answers or s.questions)).strip()
    if answer not in LETTERS[:len(options)]:
        raise EvalSetError(f"{s.answers or s.questions}: question {row['question_id']!r} has answer {answer!r}, "
                           f"not one of its option letters {list(LETTERS[:len(options)])}")
    correct = LETTERS.index(answer)
    question = field_of(row, ("question", "text"), s.questions)
    hint = str(row.get("hint") or "").strip()
    if hint and hint != "nan":
        question = f"{hint}\n{question}"
    image = {"image_b64": row["image"]} if s.questions.endswith(".tsv") else {"image_path": image_of(row, s)}
    items = []
    for k in range(len(options) if s.circular else 1):
        rotated = options[k:] + options[:k]  # LLaVA's MMBench loop: options = options[1:] + options[:1]
        letters = LETTERS[:len(rotated)]
        text = question + "".join(f"\n{letter}. {option}" for letter, option in zip(letters, rotated))
        key = f"{row['question_id']}@{k}" if s.circular else row["question_id"]
        items.append(EvalItem(key, row["question_id"], with_suffix(text, suffix), [letters[(correct - k) % len(options)]],
                              category=str(row.get("category") or "all"), options=dict(zip(letters, rotated)),
                              rotation=k, **image))
    return items
